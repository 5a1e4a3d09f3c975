"""The arena: train every entry of an arena spec to its group's training-FLOP budget on the same data and seed,
one run directory per entry, then write the energy ledger, the leaderboard and the plots.

An arena spec (experiments/arena.py) is a list of Groups (entries scored on the same data share a budget and a
leaderboard section) and Entries. Resumable: a finished entry has an atomic `arena_result.json` in its run
directory and is never retrained; the entry in progress resumes from its checkpoint through the loop's own
resume. An entry whose family is not registered, fails to import, or whose config cannot be built is listed as
missing in the leaderboard, one whose loss turns non-finite as failed (both are retried by the next run).

Seeds (`seeds`, `altbench arena --seeds N`): every entry is trained N times, with train.seed = its config's seed
+ i for i = 0..N-1 (seed i changes the initialisation and the data order; entries share both at the same i, so
comparisons are paired). Seed 0 runs in `<entry>/`, seed i in `<entry>.seed<i>/`. The leaderboard row is seed 0's
ledger plus the score's mean over seeds, its 95% t-interval and each seed's value (`seed_scores`); each row after
the first carries the paired difference to the row above it (`vs_above`: mean, 95% interval, significant when
the interval excludes 0).
"""

import dataclasses
import importlib
import json
import os
import time
from typing import Callable

import jax
import numpy as np

from altbench import archs
from altbench.train import config as config_lib
from altbench.train import decode, ledger, leaderboard, loop, metrics

RESULT = "arena_result.json"
# Rough sustained training throughput (FLOP/s) and per-entry overhead (compile, eval, decode timing) by backend,
# for the up-front ETA only; the ETA is re-estimated from the measured rate after each entry.
THROUGHPUT = {"cpu": 1.5e10, "gpu": 1e14, "tpu": 1e14}
OVERHEAD_S = {"cpu": 40.0, "gpu": 60.0, "tpu": 60.0}


@dataclasses.dataclass(frozen=True)
class Group:
  name: str              # leaderboard section
  metric: str            # "bpb" (held-out bits per byte, lower is better) or "accuracy" (reasoning, higher)
  budget_flops: float    # training FLOPs every entry of the group gets; 0: not budgeted (auxiliary runs)
  about: str = ""


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str              # run directory name and leaderboard row
  group: str
  family: str            # a name in archs.FAMILIES
  build: Callable        # build(arena_dir) -> train.config.Config; steps are then set from the group's budget
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Arena:
  name: str
  groups: tuple
  entries: tuple
  evals: int = 4                  # evaluations per entry (the bpb-vs-FLOPs curves)
  decode_tokens: int = 32         # new tokens per prompt when timing decode (tokens/s); 0 skips
  decode_prompts: int = 4
  decode_contexts: tuple = ()     # contexts for decode tokens/s vs context (lm entries); () skips
  decode_steps: int = 8
  reasoning_examples: int = 64    # eval examples decoded greedily for the answer accuracy
  recurrences: tuple = ()         # recurrent depth: also the answer accuracy at these test-time r (a compute sweep)
  xla_check: bool = True          # compile the train step once more for XLA's FLOPs and memory
  power_w: float = 0.0            # stated device power for estimated energy (0: the loop's per-backend default)
  seeds: int = 1                  # runs per entry (train.seed + 0..seeds-1): mean, 95% interval, paired differences


def flops_per_step(cfg):
  """Analytic training FLOPs of one step of cfg (vocabulary 0 resolved to the byte tokenizer's)."""
  from altbench.train import data
  model = cfg.model
  if model.vocab_size == 0:
    if cfg.data.tokenizer != "bytes":
      raise config_lib.ConfigError(f"{cfg.family}: model.vocab_size=0 with data.tokenizer={cfg.data.tokenizer!r}: "
                                   "set the vocabulary size for the FLOPs budget")
    model = dataclasses.replace(model, vocab_size=data.ByteTokenizer().vocab_size)
  family = archs.get_family(cfg.family)
  return family.flops_per_token(model, cfg.data.seq_len) * cfg.data.seq_len * cfg.train.batch_size


def fit_budget(cfg, budget, evals=4):
  """cfg with steps = round(budget / FLOPs per step); warmup, eval/ckpt cadence and a Coconut curriculum's
  steps per stage scale with it. No samples: the arena times decoding itself."""
  t, d = cfg.train, cfg.data
  steps = max(1, round(budget / flops_per_step(cfg))) if budget else t.steps
  scale = steps / t.steps
  every = max(1, -(-steps // evals))
  t = dataclasses.replace(t, steps=steps, warmup_steps=min(round(t.warmup_steps * scale), max(steps - 1, 0)),
                          eval_every=every, ckpt_every=every, samples=0, log_every=max(1, min(t.log_every, every)))
  if d.task_stage_steps:
    d = dataclasses.replace(d, task_stage_steps=max(1, round(d.task_stage_steps * scale)))
  return dataclasses.replace(cfg, data=d, train=t)


def check_family(name):
  """None if the family is registered and imports, else why not."""
  if name not in archs.FAMILIES:
    return f"family {name!r} is not registered in archs.FAMILIES"
  try:
    importlib.import_module(archs.FAMILIES[name])
  except Exception as e:  # a broken family module must not stop the arena
    return f"family {name!r} fails to import: {type(e).__name__}: {e}"
  return None


def run(arena, workdir, log=print):
  """Train (or resume) every entry; write leaderboard.md / .json and plots in workdir. Returns the leaderboard."""
  os.makedirs(workdir, exist_ok=True)
  groups = {g.name: g for g in arena.groups}
  bad = [e.name for e in arena.entries if e.group not in groups]
  if bad:
    raise config_lib.ConfigError(f"arena {arena.name}: entries {bad} name a group not in {sorted(groups)}")
  backend = jax.default_backend()
  metrics.write_json_atomic(os.path.join(workdir, "arena.json"), {
      "arena": arena.name, "versions": loop.versions(),
      "groups": [dataclasses.asdict(g) for g in arena.groups],
      "entries": [{"name": e.name, "group": e.group, "family": e.family, "note": e.note} for e in arena.entries]})
  if arena.seeds < 1:
    raise config_lib.ConfigError(f"arena {arena.name}: seeds={arena.seeds}: valid: an int >= 1")
  runs = [(e, i) for e in arena.entries for i in range(arena.seeds)]
  done = {(e.name, i): _read_result(workdir, e, i) for e, i in runs}
  stale = sorted({e.name for e, i in runs if done[e.name, i] and (done[e.name, i]["group"],
                                                                   done[e.name, i]["budget_flops"]) !=
                  (e.group, groups[e.group].budget_flops)})
  if stale:
    raise config_lib.ConfigError(f"{workdir} holds results of {stale} at another budget or group; use another "
                                 "--workdir or the same arena to resume")
  todo = [(e, i) for e, i in runs if done[e.name, i] is None]
  for g in arena.groups:
    n = sum(e.group == g.name for e in arena.entries)
    budget = f"{g.budget_flops:.3g} training FLOPs per entry" if g.budget_flops else "not budgeted (auxiliary)"
    log(f"arena {arena.name}: group {g.name} ({g.metric}): {n} entries x {arena.seeds} seed(s), {budget}")
  eta = sum(groups[e.group].budget_flops for e, _ in todo) / THROUGHPUT.get(backend, 1e12) + \
      len(todo) * OVERHEAD_S.get(backend, 60.0)
  log(f"arena {arena.name}: {len(runs) - len(todo)} runs finished, {len(todo)} to run on {backend}; "
      f"ETA ~{eta / 60:.0f} min (assumed {THROUGHPUT.get(backend, 1e12):.2g} FLOP/s; re-estimated per run)")
  spent = {"flops": 0.0, "s": 0.0}
  for k, (entry, seed) in enumerate(todo):
    group = groups[entry.group]
    reason = check_family(entry.family)
    cfg = None
    if reason is None:
      try:
        cfg = fit_budget(entry.build(workdir), group.budget_flops, arena.evals)
        if arena.power_w:
          cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, power_w=arena.power_w))
        if seed:
          cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + seed))
        if cfg.family != entry.family:
          raise config_lib.ConfigError(f"entry {entry.name}: builds family {cfg.family!r}, declared {entry.family!r}")
        config_lib.validate(cfg)
      except Exception as e:  # a builder that needs a missing family or run fails: listed as missing
        reason = f"config: {type(e).__name__}: {e}"
    if reason is not None:
      log(f"arena: {entry.name} is MISSING: {reason}")
      done[entry.name, seed] = {"name": entry.name, "group": entry.group, "family": entry.family,
                                "status": "missing", "reason": reason, "note": entry.note}
      continue
    which = f" seed {cfg.train.seed}" if arena.seeds > 1 else ""
    log(f"arena: [{k + 1}/{len(todo)}] {entry.name}{which} ({entry.family}): {cfg.train.steps} steps of "
        f"{flops_per_step(cfg):.3g} FLOPs")
    t0 = time.perf_counter()
    try:
      done[entry.name, seed] = train_entry(arena, entry, group, cfg, seed_dir(workdir, entry, seed), log)
    except loop.NonFiniteLoss as e:  # a diverged entry is a result too; the others still run
      log(f"arena: {entry.name} FAILED: {e}")
      done[entry.name, seed] = {"name": entry.name, "group": entry.group, "family": entry.family,
                                "status": "failed", "reason": str(e), "note": entry.note}
      continue
    spent["s"] += time.perf_counter() - t0
    spent["flops"] += done[entry.name, seed]["flops"]
    left = sum(groups[e.group].budget_flops for e, _ in todo[k + 1:])
    if left:
      rate = spent["flops"] / spent["s"]  # compilation, eval and decode timing included
      log(f"arena: {rate:.3g} FLOP/s so far, overheads included; ETA ~{left / rate / 60:.1f} min for the rest")
  rows = [combine_seeds([done[e.name, i] for i in range(arena.seeds)], groups[e.group].metric)
          for e in arena.entries]
  board = leaderboard.write(arena, rows, workdir)
  log(leaderboard.markdown(board))
  return board


def seed_dir(workdir, entry, seed):
  return os.path.join(workdir, entry.name if seed == 0 else f"{entry.name}.seed{seed}")


def _read_result(workdir, entry, seed=0):
  path = os.path.join(seed_dir(workdir, entry, seed), RESULT)
  return json.load(open(path)) if os.path.exists(path) else None


SCORES = {"bpb": "eval_bpb", "accuracy": "gen_acc"}


def combine_seeds(results, metric):
  """One leaderboard row from an entry's per-seed results (module docstring). A seed that is missing or failed
  makes the whole entry so (the first such reason is kept)."""
  bad = next((r for r in results if r["status"] != "done"), None)
  if bad is not None or len(results) == 1:
    return bad or results[0]
  key = SCORES[metric]
  row = dict(results[0])
  values = [r[key] for r in results]
  row["seed_scores"] = values
  row[key], row[key + "_ci_low"], row[key + "_ci_high"] = leaderboard.mean_interval(values)
  row["seeds"] = len(results)
  return row


def train_entry(arena, entry, group, cfg, run_dir, log=print):
  """Train one entry (resuming its run directory), measure its ledger and decoding; write arena_result.json."""
  with ledger.PowerTrace() as trace:
    final = loop.train(cfg, run_dir, log=log)
  cfg, family, corpus, graphdef, state, _, _ = loop.load_run(run_dir)
  xla = ledger.compiled_step_cost(cfg) if arena.xla_check else None
  row = {"name": entry.name, "group": entry.group, "family": entry.family, "status": "done", "note": entry.note,
         "pattern": getattr(cfg.model, "pattern", ""), "budget_flops": group.budget_flops,
         **ledger.run_ledger(run_dir, cfg, xla), **{k: v for k, v in final.items() if k.startswith("eval_")},
         "bound": cfg.family == "diffusion",  # the NELBO: an upper bound on bpb
         "params": int(sum(x.size for x in jax.tree.leaves(state["params"])))}
  row["flops_vs_budget"] = row["flops"] / group.budget_flops if group.budget_flops else None
  if trace.available and trace.t_s:
    row["energy_trace_j"] = trace.joules()  # board power sampled and integrated: a cross-check of the counter
  row["device_peak_bytes"] = ledger.device_peak_bytes()
  from flax import nnx
  model = nnx.merge(graphdef, state["params"], state["rest"])
  if arena.decode_tokens:
    row["decode_tokens_per_s"] = decode.decode_speed(family, model, corpus, arena.decode_prompts, arena.decode_tokens)
  from altbench.train import reasoning_tasks as rt
  if cfg.data.dataset in rt.TASKS:
    n = min(arena.reasoning_examples, cfg.data.eval_examples)
    row["gen_acc"], answers = rt.generated_accuracy(family, model, corpus, n)
    row["gen_examples"] = n
    summary = rt.answer_summary(corpus.eval_examples()[:n], answers)
    row["gen_valid"], row["chance_acc"] = summary["valid"], summary["chance"]
    row["test_flops_per_answer"] = answer_flops(cfg, corpus, n)
    if cfg.family == "recurrent" and arena.recurrences:
      row["recurrence_sweep"] = [[r, answer_flops(cfg, corpus, n, iters=r),
                                  rt.generated_accuracy(family, model, corpus, n, iters=r)[0]] for r in arena.recurrences]
  if arena.decode_contexts and cfg.family == "lm":
    row["decode_curve"] = decode.decode_curve(cfg.model, arena.decode_contexts, arena.decode_steps)
  row["curve"] = [[line["flops"], line["eval_bpb"]] for line in metrics.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                  if "eval_bpb" in line]
  metrics.write_json_atomic(os.path.join(run_dir, RESULT), row)
  return row


def answer_flops(cfg, corpus, n, iters=None):
  """Analytic forward FLOPs to reach an answer (test-time compute): forward FLOPs per position (the core
  iterated r = iters_at_test times for recurrent depth) times the positions of an example at the final stage:
  question, CoT steps (CoT), continuous thoughts (Coconut, one position each) and the answer."""
  from altbench.train import reasoning_tasks as rt
  family, model = archs.get_family(cfg.family), cfg.model
  if cfg.family == "recurrent":
    r = iters or model.iters_at_test
    model = dataclasses.replace(model, backprop_iters=r, max_iters=r)  # r passes with gradients, none free
  elif hasattr(model, "thoughts"):
    model = dataclasses.replace(model, thoughts=0, prefix_len=0)  # thoughts are counted as positions below
  fwd = family.flops_per_token(model, cfg.data.seq_len) / 3  # training = forward + backward (2x forward)
  lay = corpus.layout
  lengths = [sum(map(len, rt.encode(ex, lay.mode, pause=lay.pause, stage=lay.max_stage, thoughts=lay.thoughts,
                                    max_stage=lay.max_stage)[:2])) for ex in corpus.eval_examples()[:n]]
  return float(fwd * np.mean(lengths))


def load(spec):
  """'experiments/arena.py[:variant]' -> Arena (the file defines get_arena(variant))."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise config_lib.ConfigError(f"arena file {path!r} does not exist (expected experiments/arena.py[:variant])")
  module = config_lib.load_module(path)
  if not hasattr(module, "get_arena"):
    raise config_lib.ConfigError(f"arena file {path!r} defines no get_arena(variant)")
  out = module.get_arena(variant)
  if not isinstance(out, Arena):
    raise config_lib.ConfigError(f"{path}: get_arena({variant!r}) returned {type(out).__name__}, expected train.arena.Arena")
  return out
