"""The training loop every family shares: resolve config, data, sharded state, step, eval, checkpoints, samples.

A run directory holds config.json, metrics.jsonl, checkpoints/, samples/ and data/. Running the same
command on it again resumes from the newest readable checkpoint; batches depend only on (seed, step),
so the resumed losses equal those of an uninterrupted run.
"""

import dataclasses
import functools
import math
import os
import platform
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from altbench import archs
from altbench.train import checkpoint, config, data, grpo, mesh, metrics, step


class NonFiniteLoss(RuntimeError):
  pass


class Interrupted(RuntimeError):
  pass


def versions():
  import flax
  import optax
  import orbax.checkpoint
  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "orbax": orbax.checkpoint.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), "devices": jax.device_count(), "processes": jax.process_count(),
          "device_kind": jax.devices()[0].device_kind}


def resolve(cfg, workdir):
  """Validate, load the corpus, fill the vocabulary size; refuse to resume a directory with another config.

  Raises ConfigError / DataError before anything is written to workdir (a BPE tokenizer is trained and
  cached only once the config is known to be valid and compatible).
  """
  config.validate(cfg)
  saved = config.read_run_config(workdir) if os.path.exists(os.path.join(workdir, "config.json")) else None
  corpus = data.load_corpus(cfg.data, workdir if saved is not None else None)
  if cfg.model.vocab_size == 0:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=corpus.tokenizer.vocab_size))
  elif cfg.model.vocab_size < corpus.tokenizer.vocab_size:
    raise config.ConfigError(f"model.vocab_size={cfg.model.vocab_size}: smaller than the tokenizer's "
                             f"{corpus.tokenizer.vocab_size} (use 0 to take the tokenizer's)")
  # Families name the special tokens they use as <name>_id fields (mask_id, eos_id, ...); -1 means "from the
  # tokenizer".
  specials = {f"{name.strip('<>')}_id": idx for name, idx in corpus.tokenizer.special.items()}
  fill = {k: v for k, v in specials.items() if getattr(cfg.model, k, 0) == -1}
  if fill:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fill))
  if saved is not None:
    # run directories written before GRPO existed: supervised, default rl section
    saved = dict(saved, train={"objective": "supervised", **saved["train"]},
                 rl=saved.get("rl", config.to_dict(config.Config())["rl"]))
    changed = [f for f in config.diff(saved, config.to_dict(cfg)) if f not in config.RESUMABLE_CHANGES]
    if changed:
      raise config.ConfigError(f"{workdir} holds a run with a different config ({', '.join(changed)}); "
                               "use another --workdir or the same settings to resume")
  return cfg, corpus


def abstract_state(family, cfg, tx, mesh_):
  """(graphdef, abstract state with shardings, shardings, init fn) without allocating any parameter."""
  holder = {}

  def init():
    holder["graphdef"], state = step.init_state(family, cfg.model, tx, cfg.train.seed)
    return state

  shapes = jax.eval_shape(init)
  shardings = mesh.state_shardings(mesh_, shapes)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  return holder["graphdef"], abstract, shardings, init


def load_run(workdir):
  """(cfg, family, corpus, graphdef, state, mesh) of a finished or running run directory, for eval/sample/probe."""
  cfg, family, graphdef, state, mesh_, restored_step = _restore_run(workdir)
  return cfg, family, data.load_corpus(cfg.data, workdir), graphdef, state, mesh_, restored_step


def load_model(run_dir):
  """(cfg, model) of a run directory's newest checkpoint, its weights numpy constants: safe to build inside a
  trace (a frozen model embedded in another one is loaded while that one is built under jit)."""
  cfg, params = _latest_params(os.path.abspath(run_dir))
  model = step.build_model(archs.get_family(cfg.family), cfg.model, nnx.Rngs(0))
  nnx.update(model, jax.tree.map(jnp.asarray, params))
  return cfg, model


@functools.lru_cache(maxsize=8)
def _latest_params(run_dir):
  with jax.ensure_compile_time_eval():
    cfg, _, _, state, _, _ = _restore_run(run_dir)
    return cfg, jax.tree.map(np.asarray, state["params"])


def _restore_run(workdir):
  """load_run without the corpus (reading it can take seconds): (cfg, family, graphdef, state, mesh, step)."""
  cfg = config.from_dict(config.read_run_config(workdir))
  family = archs.get_family(cfg.family)
  mesh_ = mesh.make_mesh(cfg.mesh)
  tx = step.make_optimizer(cfg.train)
  graphdef, abstract, _, _ = abstract_state(family, cfg, tx, mesh_)
  ckpt = checkpoint.Checkpointer(workdir, cfg.train.keep_checkpoints)
  restored_step, state = ckpt.restore(abstract)
  ckpt.close()
  if state is None:
    raise FileNotFoundError(f"{workdir}/checkpoints has no readable checkpoint")
  return cfg, family, graphdef, state, mesh_, restored_step


def evaluate(family, graphdef, state, corpus, cfg, mesh_):
  """Held-out loss per token and bits per byte over the fixed eval bytes.

  With train.eval_repeats = K > 1 the eval set is scored K times with different noise (diffusion draws t
  and masks); eval_bpb is the mean and eval_bpb_se its standard error. Deterministic families give se 0.
  """
  eval_fn = jax.jit(step.make_eval_step(family, graphdef))
  sharding = mesh.batch_sharding(mesh_)
  n_dev = jax.device_count()
  batch_size = -(-cfg.train.batch_size // n_dev) * n_dev
  batches = [mesh.put_batch({k: v[None] for k, v in b.items()}, sharding)
             for b in corpus.eval_batches(batch_size, cfg.data.seq_len)]
  repeats = []
  for r in range(cfg.train.eval_repeats):
    totals = {}
    for i, batch in enumerate(batches):
      rng = jax.random.fold_in(jax.random.key(r), i)
      out = eval_fn(state["params"], state["rest"], jax.tree.map(lambda x: x[0], batch), rng)
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    repeats.append(totals)
  totals = {k: float(np.mean([t[k] for t in repeats])) for k in repeats[0]}
  out = {"eval_loss": totals["nats"] / totals["tokens"], "eval_bpb": metrics.bits_per_byte(totals["nats"], totals["bytes"]),
         "eval_tokens": int(totals["tokens"]), "eval_bytes": int(totals["bytes"])}
  if len(repeats) > 1:
    bpbs = [metrics.bits_per_byte(t["nats"], t["bytes"]) for t in repeats]
    out["eval_bpb_se"] = float(np.std(bpbs, ddof=1) / np.sqrt(len(bpbs)))
  if "correct" in totals:
    out["eval_acc"] = totals["correct"] / totals["tokens"]
  if "exact" in totals:  # whole answers right (reasoning tasks)
    out["eval_exact"] = totals["exact"] / max(totals["examples"], 1.0)
  if "patches" in totals:  # byte families (megabyte, blt): mean tokens per patch
    out["eval_patch_len"] = totals["tokens"] / max(totals["patches"], 1.0)
  if "thoughts" in totals:  # coconut with thought_loss: the thoughts' readout loss per thought
    out["eval_thought_nll"] = totals["thought_nats"] / max(totals["thoughts"], 1.0)
  if "iters" in totals:  # mean recurrences per token (recurrent depth)
    out["eval_iters"] = totals["iters"] / totals["tokens"]
  return out


def sample_texts(family, graphdef, state, corpus, cfg, n, length, seed=0, prompt=None, temperature=0.8, top_k=0,
                 top_p=0.95):
  """(prompt, continuation) pairs: from held-out document openings, or from the given prompt text."""
  tok = corpus.tokenizer
  if prompt is not None:
    prompts = [np.concatenate([[tok.special["<eos>"]], tok.encode(prompt)])] * n
  else:
    prompts = corpus.prompts(n)
  model = nnx.merge(graphdef, state["params"], state["rest"])
  out = family.generate(model, np.stack(prompts), length, jax.random.key(seed), temperature=temperature,
                        top_k=top_k, top_p=top_p)
  out = np.asarray(out)
  width = len(prompts[0])
  return [(tok.decode(row[:width]), tok.decode(row[width:])) for row in out]


def _write_samples(workdir, step_, pairs):
  os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
  path = os.path.join(workdir, "samples", f"step_{step_:07d}.txt")
  text = "".join(f"=== sample {i} ===\n[prompt] {p}\n[continuation] {c}\n\n" for i, (p, c) in enumerate(pairs))
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
  return text


def _params_from(run_dir, family, model_cfg):
  """The latest parameters of run_dir, checked against model_cfg's (same tree, shapes and dtypes)."""
  try:
    theirs = _restore_run(run_dir)[3]["params"]
  except (FileNotFoundError, config.ConfigError) as e:  # not a run directory, or one without a checkpoint
    raise config.ConfigError(f"train.init_from={run_dir!r}: {e}") from None
  mine = nnx.state(nnx.eval_shape(lambda: step.build_model(family, model_cfg, nnx.Rngs(0))), nnx.Param)
  flat = lambda t: {jax.tree_util.keystr(k): (x.shape, str(x.dtype))
                    for k, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(mine), flat(theirs)
  diff = [f"{k}: {a.get(k)} here, {b.get(k)} there" for k in sorted({*a, *b}) if a.get(k) != b.get(k)]
  if diff:
    raise config.ConfigError(f"train.init_from={run_dir!r}: its parameters do not fit this model ({len(diff)} "
                             f"differ, e.g. {'; '.join(diff[:3])})")
  return theirs


def train(cfg, workdir, log=print):
  """Train (or resume) cfg in workdir. Returns the final eval metrics.

  The run's mesh is the ambient mesh (jax.set_mesh) while it trains, so the kernels run their Pallas calls under
  shard_map over its batch axes (kernels/pallas_common.shard_batch); without one, GSPMD would replicate them.
  """
  try:
    mesh_ = mesh.make_mesh(cfg.mesh)
  except ValueError as e:
    raise config.ConfigError(str(e)) from None
  with jax.set_mesh(mesh_):
    return _train(cfg, workdir, log)


def _sft_stage(cfg, workdir, log):
  """GRPO's rl.sft_steps > 0: train the supervised start in WORKDIR/sft (resumed or found finished like any run);
  returns that directory."""
  config.validate(cfg)
  n = cfg.rl.sft_steps
  sft = dataclasses.replace(cfg, rl=config.RLConfig(), train=dataclasses.replace(
      cfg.train, objective="supervised", steps=n, lr=cfg.rl.sft_lr, warmup_steps=n // 20, min_lr_ratio=0.1,
      batch_size=cfg.rl.sft_batch_size or cfg.train.batch_size,
      eval_every=max(n // 4, 1), ckpt_every=max(n // 4, 1), log_every=min(cfg.train.log_every * 10, n)))
  sft_dir = os.path.join(workdir, "sft")
  log(f"altbench: GRPO starts from a supervised stage of {cfg.rl.sft_steps} steps in {sft_dir}")
  train(sft, sft_dir, log)
  return sft_dir


def _train(cfg, workdir, log):
  rl = cfg.rl if cfg.train.objective == "grpo" else None
  init_dir = _sft_stage(cfg, workdir, log) if rl and rl.sft_steps else cfg.train.init_from
  cfg, corpus = resolve(cfg, workdir)
  family = archs.get_family(cfg.family)
  main = jax.process_index() == 0
  fresh = not os.path.isdir(os.path.join(workdir, "checkpoints"))
  # checked before anything is written; a resumed run has its own parameters (GRPO reloads them: its reference)
  init_params = _params_from(init_dir, family, cfg.model) if init_dir and (fresh or rl) else None
  os.makedirs(workdir, exist_ok=True)
  if main:
    metrics.write_json_atomic(os.path.join(workdir, "config.json"), {"config": config.to_dict(cfg), "versions": versions()})
    data.save_stats(corpus, workdir)
    if cfg.data.tokenizer == "bpe":
      corpus.tokenizer.save(os.path.join(workdir, "data", "tokenizer.json"))

  tcfg, seq_len = cfg.train, cfg.data.seq_len
  mesh_ = mesh.make_mesh(cfg.mesh)
  n_dev = jax.device_count()
  micro = tcfg.batch_size // tcfg.grad_accum
  if micro % n_dev:
    raise config.ConfigError(f"train.batch_size={tcfg.batch_size} / grad_accum={tcfg.grad_accum} = {micro} "
                             f"sequences per micro-batch must be a multiple of the {n_dev} devices")
  # GRPO takes rl.updates optimizer steps per loop step: the schedule spans all of them
  opt_cfg = tcfg if rl is None else dataclasses.replace(tcfg, steps=tcfg.steps * rl.updates,
                                                        warmup_steps=tcfg.warmup_steps * rl.updates)
  tx = step.make_optimizer(opt_cfg)
  graphdef, abstract, shardings, init = abstract_state(family, cfg, tx, mesh_)
  ckpt = checkpoint.Checkpointer(workdir, tcfg.keep_checkpoints)
  start, state = ckpt.restore(abstract)
  if state is None:
    state = jax.jit(init, out_shardings=shardings)()
    if init_params is not None:
      state = dict(state, params=jax.device_put(init_params, shardings["params"]))
      log(f"altbench: parameters from {init_dir}")
  else:
    log(f"altbench: resuming {workdir} from step {start}")
  rollouts = None
  if rl is not None:  # the frozen reference: the start's parameters (init_from's, else the seed's initial ones)
    ref = None
    if rl.beta > 0:
      ref = (jax.device_put(jax.tree.map(jnp.copy, init_params), shardings["params"]) if init_params is not None
             else jax.jit(init, out_shardings=shardings)()["params"])  # a copy: the state's buffers are donated
    rollouts = grpo.Rollouts(family, cfg.family, cfg.model, rl, graphdef, ref, grpo.max_new_tokens(rl, corpus))
  final = [line for line in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if line.get("final")]
  if start >= tcfg.steps and final:
    ckpt.close()
    log(f"altbench: {workdir} already finished {tcfg.steps} steps: held-out {final[-1]['eval_bpb']:.4f} bits per byte")
    return {k: v for k, v in final[-1].items() if k.startswith("eval_")}
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  flops_per_token = family.flops_per_token(cfg.model, seq_len)
  tokens_per_step = tcfg.batch_size * seq_len
  if rollouts is not None:  # rows of prompt + completion; training FLOPs per token are 3 forwards: the updates,
    # plus the rollout's generation and old / reference log-probs at one forward each (an estimate: cached decoding
    # and recomputation cost differ)
    seq_len = corpus.layout.prefix_len + rollouts.n_new
    tokens_per_step = tcfg.batch_size * seq_len
    flops_per_token = family.flops_per_token(cfg.model, seq_len) * (rl.updates + (2 + (rl.beta > 0)) / 3)
  if main:
    log(f"altbench: {cfg.family} {getattr(cfg.model, 'pattern', '')} with {n_params / 1e6:.2f}M parameters; "
        f"{tokens_per_step} tokens and {flops_per_token * tokens_per_step:.3g} FLOPs per step; "
        f"{n_dev} device(s) mesh {dict(mesh_.shape)}; {corpus.stats['train_tokens']} train tokens")

  objective = family if rl is None else grpo.LossFamily(cfg.family, rl)
  step_fn = jax.jit(step.make_train_step(objective, graphdef, tx, opt_cfg), donate_argnums=0,
                    out_shardings=(shardings, None))
  batch_sharding = mesh.batch_sharding(mesh_)
  rows = mesh.process_rows(batch_sharding, tcfg.grad_accum, micro)  # each process reads its own rows only
  log_path = os.path.join(workdir, "metrics.jsonl")
  mlog = metrics.MetricsLog(log_path, start) if main else None
  prev_wall = (mlog.last.get("wall_s", 0.0) if mlog else 0.0)
  prev_energy = (mlog.last.get("energy_j", 0.0) if mlog else 0.0)
  meter = metrics.EnergyMeter(tcfg.power_w)
  t0 = time.perf_counter()
  meter.start(0.0)

  def ledger(s):  # every process calls it at the same steps: the energy is gathered over processes
    wall = time.perf_counter() - t0
    return {"step": s, "tokens": s * tokens_per_step, "flops": float(s) * tokens_per_step * flops_per_token,
            "wall_s": prev_wall + wall, "energy_j": prev_energy + meter.total_joules(wall),
            "energy_source": meter.source}

  stop = {"signal": None}
  multi = jax.process_count() > 1
  if not multi:
    handlers = {sig: signal.signal(sig, lambda signum, _: stop.update(signal=signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
  else:  # JAX's preemption notifier takes SIGTERM on any process; all agree on the step to stop at (below)
    handlers = {signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM))}

  def check(s, out):
    host = {k: float(v) for k, v in out.items()}
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(host[k])]
    if bad:
      raise NonFiniteLoss(f"step {s}: {bad[0]} is {host[bad[0]]}; stopped, the last good checkpoint in "
                          f"{ckpt.directory} is step {max(ckpt.manager.all_steps(), default=0)}")
    return host

  pending = None  # (step, device metrics) of the step before, fetched after the next is dispatched
  bar = tqdm(total=tcfg.steps, initial=start, desc=f"train {os.path.basename(workdir.rstrip('/'))}",
             disable=not main, dynamic_ncols=True, mininterval=1.0)
  def rl_eval():
    return grpo.eval_pass_at_1(family, nnx.merge(graphdef, state["params"], state["rest"]), corpus, cfg)

  try:
    if rollouts is not None and start == 0:  # where GRPO starts from
      ev = rl_eval()
      if mlog:
        mlog.write({**ledger(0), **ev})
      if main:
        log("step 0: " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
    for s in range(start, tcfg.steps):
      rng = jax.random.fold_in(jax.random.key(tcfg.seed), s)
      if rollouts is None:
        batch = corpus.train_batch(tcfg.seed, s, tcfg.batch_size, seq_len, rows=rows)
        batch = {k: v.reshape(tcfg.grad_accum, micro, *v.shape[1:]) for k, v in batch.items()}
        state, out = step_fn(state, mesh.put_batch(batch, batch_sharding), rng)
      else:  # rollouts of (seed, step, params), then rl.updates steps on them
        batch, host = rollouts.task(state["params"], state["rest"], corpus, cfg, s)
        batch = mesh.put_batch({k: v.reshape(tcfg.grad_accum, micro, *v.shape[1:]) for k, v in batch.items()},
                               batch_sharding)
        outs = []
        for u in range(rl.updates):
          state, o = step_fn(state, batch, jax.random.fold_in(rng, u))
          outs.append(o)
        out = grpo.step_metrics(outs, host)
      if pending is not None:
        _log_train(pending, check, mlog, ledger, tcfg, bar)
      pending = (s + 1, out)
      done = s + 1
      if multi and not stop["signal"] and multihost_utils.reached_preemption_sync_point(done):
        stop["signal"] = signal.SIGTERM
      at_eval = tcfg.eval_every and done % tcfg.eval_every == 0 and done < tcfg.steps
      at_ckpt = tcfg.ckpt_every and done % tcfg.ckpt_every == 0 and done < tcfg.steps
      if at_eval or at_ckpt or stop["signal"]:
        _log_train(pending, check, mlog, ledger, tcfg, bar)
        pending = None
      if at_eval:
        ev = evaluate(family, graphdef, state, corpus, cfg, mesh_)
        if rollouts is not None:
          ev.update(rl_eval())
        row = ledger(done)
        if mlog:
          mlog.write({**row, **ev})
        if main:
          bar.write(f"step {done}: " + " ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float)))
      if at_ckpt or stop["signal"]:
        ckpt.save(done, state)
      if stop["signal"]:
        raise Interrupted(f"interrupted by signal {stop['signal']} at step {done}; checkpoint saved, rerun to resume")
    if pending is not None:
      _log_train(pending, check, mlog, ledger, tcfg, bar)
    bar.close()
    ckpt.save(tcfg.steps, state)
    result = evaluate(family, graphdef, state, corpus, cfg, mesh_)
    if rollouts is not None:
      result.update(rl_eval())
    row = ledger(tcfg.steps)
    if mlog:
      mlog.write({**row, **result, "final": True})
    if main:
      acc = f"; argmax accuracy {result['eval_acc']:.4f} on scored tokens" if "eval_acc" in result else ""
      log(f"altbench: held-out {result['eval_bpb']:.4f} bits per byte (loss {result['eval_loss']:.4f} nats/token "
          f"over {result['eval_bytes']} bytes){acc}; energy {meter.source}")
    if tcfg.samples:
      pairs = sample_texts(family, graphdef, state, corpus, cfg, tcfg.samples, tcfg.sample_len, seed=tcfg.seed)
      if main:
        log(_write_samples(workdir, tcfg.steps, pairs))
  finally:
    bar.close()
    ckpt.close()
    if mlog:
      mlog.close()
    for sig, handler in handlers.items():
      signal.signal(sig, handler)
  return result


def _log_train(pending, check, mlog, ledger, tcfg, bar):
  s, out = pending
  host = check(s, out)
  bar.update(s - bar.n)
  if s % tcfg.log_every == 0 or s == tcfg.steps:
    bar.set_postfix(loss=f"{host['loss']:.4f}", refresh=False)
    row = ledger(s)
    if mlog:
      mlog.write({**row, "loss": host["loss"], "lr": host["lr"], "grad_norm": host["grad_norm"],
                  **{k: host[k] for k in grpo.LOGGED if k in host}})
