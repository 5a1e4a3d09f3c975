"""Training throughput: altbench's transformer (JAX/XLA) against Hugging Face LlamaForCausalLM (PyTorch).

What it measures
  Both frameworks train the same model in one process, on the CPU, side by side: a Llama-style
  decoder with d_model 256, 4 layers, 4 heads of 64 (no GQA), SwiGLU of width `lm.Config().ffn_dim`
  (704), vocabulary 256, RMSNorm eps 1e-5, RoPE theta 1e4, untied embeddings, float32 everywhere,
  AdamW (lr 1e-3, betas (0.9, 0.95), weight decay 0.1 on matrices only, eps 1e-8), global-norm
  clipping at 1.0. A step is forward + backward + clip + AdamW update on one (batch, length) batch
  of uniformly random byte tokens (a fresh batch every step, so the loss stays near ln 256 and every
  round does the same work).

  * altbench: the real train step (`train.step.make_optimizer`, `init_state`, `make_train_step`
    with a `train.config.TrainConfig`, clipping etc. at their defaults), `jax.jit(...,
    donate_argnums=0)`, batches shaped (grad_accum=1, batch, length) with inputs / targets /
    segment_ids / loss_mask / nbytes as `train.loop` feeds them, rng folded in per step as the loop
    does. The schedule is made flat (warmup 0, a huge step count), so lr is 1e-3 as for torch.
  * hf_torch: `transformers.LlamaForCausalLM`, eager, its default attention ("sdpa", which on the CPU
    runs a causal flash kernel), cross-entropy on the logits, `clip_grad_norm_`, `torch.optim.AdamW`
    (param groups: decay on matrices only). torch.set_flush_denormal(True), as XLA:CPU flushes
    denormals; without it eager kernels slow down once activations underflow.

  Batches are built before timing, so data loading is not measured. Each framework is warmed up
  first (for JAX that includes the XLA compile). Then `--repeats` rounds alternate the frameworks,
  the order flipping every round; a round times `--steps` steps and ends with `block_until_ready`
  (JAX dispatches asynchronously; torch on the CPU is synchronous and its loss is read with
  `.item()`). Reported step time is the median over rounds.

Shared machines
  Eager torch with OpenMP threads is very sensitive to other processes on the same cores: every
  parallel region waits for its slowest thread, so one stolen core can make a step several times
  slower (seen here: 340 ms quiet, 1-5 s under a load average of 6 on 2 cores), while XLA's
  fewer, larger tasks degrade far less. A ratio taken on a busy machine therefore flatters altbench.
  So each round records the foreign load (the share of the cores other processes used meanwhile,
  from /proc/stat minus this process's CPU time); before a round the script waits up to
  `--wait-idle` seconds for a quiet machine, and a round with foreign load >= 0.1 is run again (up to
  `--retries` re-runs in all). If rounds stay noisy after that they are kept, and "quiet_rounds" says
  how many were clean. "cpu_ms_per_step" (this process's CPU time per step) is a second, load-robust
  view of the work each framework does; torch's includes OpenMP spin-waiting under load.

Threads
  torch.set_num_threads(os.cpu_count()). XLA:CPU sizes its intra-op pool to the machine's cores by
  default (the YNNPACK dot fusions use the same pool); XLA_FLAGS from the environment, if any, are
  reported in the "xla_flags" field.

How to read it
  One JSON line for the machine, then one per implementation: tokens_per_s = batch * length / median
  step time, step_ms that median in milliseconds, step_ms_all every kept round, foreign_load_all the
  load during each, params the parameter count (the two must be equal), loss_first the loss of the
  first step (both near ln(256) = 5.545). The last line has "ratio" = altbench tokens/s / hf_torch
  tokens/s (> 1: altbench faster; target 1.5), also from the best rounds ("ratio_min") and from CPU
  time ("ratio_cpu_time"). Trust "ratio" when both quiet_rounds are (nearly) all rounds.
  Numbers hold for this machine only; compare ratios, not absolute speeds, across machines.

  python experiments/bench/train_throughput.py [--steps 5 --repeats 7] [--out experiments/results/x.json]
  altbench bench train_throughput --steps 5 --repeats 7
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time


import jax
import jax.numpy as jnp
import numpy as np

from altbench.archs import lm
from altbench.train import step as train_step
from altbench.train.config import TrainConfig

D_MODEL, N_LAYERS, N_HEADS, VOCAB = 256, 4, 4, 256
LR, B1, B2, WEIGHT_DECAY, EPS, GRAD_CLIP = 1e-3, 0.9, 0.95, 0.1, 1e-8, 1.0
NORM_EPS, ROPE_THETA, SEED = 1e-5, 10000.0, 0
QUIET = 0.1  # a round is "quiet" when other processes kept under 10% of the cores busy during it


def model_config(**overrides):
  fields = dict(pattern="A" * N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, n_kv_heads=0, vocab_size=VOCAB,
                norm_eps=NORM_EPS, rope_theta=ROPE_THETA, tie_embeddings=False, dtype="float32",
                param_dtype="float32")
  return lm.Config(**{**fields, **overrides})


def make_batches(batch, length, n, seed=SEED):
  """Random byte windows of length + 1, split as train.data._make_batch does (one segment, no padding)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    windows = rng.integers(0, VOCAB, size=(batch, length + 1), dtype=np.int32)
    inputs, targets = windows[:, :-1], windows[:, 1:]
    out.append({"inputs": inputs, "targets": targets, "segment_ids": np.ones_like(inputs),
                "loss_mask": np.ones_like(targets), "nbytes": np.ones_like(targets)})
  return out


class AltbenchCase:
  """altbench's own train step, jitted with donation, as train.loop runs it."""

  name = "altbench"

  def __init__(self, batches, cfg=None):
    self.cfg = cfg or model_config()
    self.tcfg = TrainConfig(steps=10**9, batch_size=batches[0]["inputs"].shape[0], grad_accum=1, lr=LR,
                            warmup_steps=0, min_lr_ratio=1.0, weight_decay=WEIGHT_DECAY, b1=B1, b2=B2,
                            grad_clip=GRAD_CLIP, seed=SEED)
    tx = train_step.make_optimizer(self.tcfg)
    self.graphdef, state = train_step.init_state(lm, self.cfg, tx, SEED)
    self.state = jax.device_put(state)
    self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state["params"]))
    self.step_fn = jax.jit(train_step.make_train_step(lm, self.graphdef, tx, self.tcfg), donate_argnums=0)
    self.batches = [{k: jnp.asarray(v)[None] for k, v in b.items()} for b in batches]  # (grad_accum=1, b, l)
    self.key = jax.random.key(SEED)
    self.i = 0
    self.threads = os.cpu_count()  # XLA:CPU's intra-op pool defaults to one thread per core
    self.batch_shape = batches[0]["inputs"].shape
    dev = jax.devices()[0]
    self.device = f"{dev.platform} ({cpu_model() or platform.machine()}, {os.cpu_count()} cores)"

  def extra(self):
    return {"framework": f"jax {jax.__version__} / flax nnx", "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "attn_impl": self.cfg.attn_impl, "dtype": self.cfg.dtype}

  def run(self, n):
    """n steps; returns the last step's loss (a float, after waiting for the device)."""
    out = None
    for _ in range(n):
      rng = jax.random.fold_in(self.key, self.i)
      self.state, out = self.step_fn(self.state, self.batches[self.i % len(self.batches)], rng)
      self.i += 1
    jax.block_until_ready((self.state, out))
    return float(out["loss"])


class TorchCase:
  """transformers.LlamaForCausalLM, eager PyTorch on the CPU, the same model and optimizer."""

  name = "hf_torch"

  def __init__(self, batches, ffn_dim, attn_implementation="sdpa"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    self.torch = torch
    self.threads = os.cpu_count()
    torch.set_num_threads(self.threads)
    torch.set_flush_denormal(True)  # XLA:CPU flushes denormals to zero; match it (eager kernels slow down on them)
    torch.manual_seed(SEED)
    hf_cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=ffn_dim,
                         num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS,
                         head_dim=D_MODEL // N_HEADS, hidden_act="silu", rms_norm_eps=NORM_EPS,
                         rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                         max_position_embeddings=max(b["inputs"].shape[1] for b in batches),
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False, use_cache=False,
                         initializer_range=0.02, attention_dropout=0.0, dtype="float32")
    self.model = LlamaForCausalLM._from_config(hf_cfg, attn_implementation=attn_implementation,
                                               dtype=torch.float32).train()
    decay = [p for p in self.model.parameters() if p.ndim >= 2]
    no_decay = [p for p in self.model.parameters() if p.ndim < 2]
    self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(B1, B2), eps=EPS)
    self.params = sum(p.numel() for p in self.model.parameters())
    self.batches = [(torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long()) for b in batches]
    self.i = 0
    self.batch_shape = batches[0]["inputs"].shape
    self.device = f"cpu ({cpu_model() or platform.machine()}, {os.cpu_count()} cores)"
    self.attn_implementation = attn_implementation

  def extra(self):
    torch = self.torch
    return {"framework": f"torch {torch.__version__} eager / transformers {__import__('transformers').__version__}",
            "torch_threads": torch.get_num_threads(), "attn_implementation": self.attn_implementation,
            "flush_denormal": True}

  def train_step(self, inputs, targets):
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    logits = self.model(input_ids=inputs, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
    self.opt.step()
    return loss

  def run(self, n):
    loss = None
    for _ in range(n):
      loss = self.train_step(*self.batches[self.i % len(self.batches)])
      self.i += 1
    return float(loss.item())


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    return ""


def machine():
  import torch
  return {"bench": "train_throughput", "machine": {
      "processor": platform.processor(), "cpu_model": cpu_model(), "machine": platform.machine(),
      "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None), "torch": torch.__version__,
      "transformers": __import__("transformers").__version__, "jax_device": str(jax.devices()[0]),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}}


def system_busy_s():
  """CPU-seconds all processes have been busy since boot (/proc/stat), or None where unavailable."""
  try:
    with open("/proc/stat") as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
  """Share of the machine's cores that other processes kept busy over an interval (0: we had it to ourselves)."""

  def __enter__(self):
    self.b0, self.c0, self.t0 = system_busy_s(), time.process_time(), time.perf_counter()
    return self

  def __exit__(self, *exc):
    b1, c1, t1 = system_busy_s(), time.process_time(), time.perf_counter()
    self.wall_s, self.cpu_s = t1 - self.t0, c1 - self.c0
    self.frac = (None if self.b0 is None else
                 max(0.0, ((b1 - self.b0) - self.cpu_s) / (os.cpu_count() * max(self.wall_s, 1e-9))))


def wait_idle(max_wait_s, threshold=QUIET, probe_s=0.5):
  """Sleep until other processes use under `threshold` of the cores over `probe_s`, or max_wait_s passes."""
  deadline = time.perf_counter() + max_wait_s
  while True:
    with ForeignLoad() as load:
      time.sleep(probe_s)
    if load.frac is None or load.frac < threshold or time.perf_counter() >= deadline:
      return load.frac


def benchmark(cases, steps, repeats, warmup, emit, wait_idle_s=0.0, retries=0):
  """Warm up each case, then alternate timed rounds; emit one result dict per case, return them by name.

  Each round records its wall time, this process's CPU time and the foreign load (other processes' share
  of the cores during the round). A round with foreign load >= QUIET is run again, up to `retries` times
  in all, so that on a shared machine the median is over rounds that had the cores to themselves;
  the rounds thrown away are listed under "noisy_rounds_ms".
  """
  first = {}
  for case in cases:
    t0 = time.perf_counter()
    first[case.name] = case.run(1)
    warm = case.run(warmup - 1) if warmup > 1 else first[case.name]
    print(f"# {case.name}: warm-up {warmup} steps in {time.perf_counter() - t0:.1f}s, first loss "
          f"{first[case.name]:.4f} (ln {VOCAB} = {math.log(VOCAB):.4f}), loss after warm-up {warm:.4f}",
          file=sys.stderr, flush=True)
  kept = {case.name: [] for case in cases}
  noisy = {case.name: [] for case in cases}
  last = {}
  for r in range(repeats):
    for case in (cases if r % 2 == 0 else cases[::-1]):
      while True:
        if wait_idle_s > 0:
          wait_idle(wait_idle_s)
        with ForeignLoad() as load:
          last[case.name] = case.run(steps)
        row = (load.wall_s / steps, load.cpu_s / steps, load.frac)
        print(f"# round {r} {case.name}: {row[0] * 1e3:.1f} ms/step, foreign load "
              f"{'?' if load.frac is None else round(load.frac, 2)}", file=sys.stderr, flush=True)
        if load.frac is None or load.frac < QUIET or retries <= 0:
          kept[case.name].append(row)
          break
        retries -= 1
        noisy[case.name].append(row)
  results = {}
  for case in cases:
    b, l = case.batch_shape
    walls = [w for w, _, _ in kept[case.name]]
    step_s = statistics.median(walls)
    results[case.name] = {
        "bench": "train_throughput", "impl": case.name, "tokens_per_s": round(b * l / step_s, 1),
        "step_ms": round(step_s * 1e3, 2), "params": case.params, "threads": case.threads, "device": case.device,
        "batch": b, "length": l, "steps": steps, "repeats": repeats,
        "loss_first": round(first[case.name], 4), "loss_last": round(last[case.name], 4),
        "step_ms_min": round(min(walls) * 1e3, 2),
        "cpu_ms_per_step": round(statistics.median(c for _, c, _ in kept[case.name]) * 1e3, 2),
        "step_ms_all": [round(w * 1e3, 2) for w in walls],
        "foreign_load_all": [None if f is None else round(f, 3) for _, _, f in kept[case.name]],
        "quiet_rounds": sum(f is not None and f < QUIET for _, _, f in kept[case.name]),
        "noisy_rounds_ms": [round(w * 1e3, 1) for w, _, _ in noisy[case.name]],
        **case.extra()}
    emit(results[case.name])
  return results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=5, help="timed steps per round")
  p.add_argument("--repeats", type=int, default=7, help="timed rounds per framework (median reported)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--wait-idle", type=float, default=5.0,
                 help="before each round wait up to this many seconds for other processes to go quiet (0: never)")
  p.add_argument("--retries", type=int, default=-1,
                 help="re-runs allowed in all for rounds disturbed by other processes (-1: 2 x repeats)")
  p.add_argument("--out", default="", help="also write the JSON lines (machine line first) to this file")
  args = p.parse_args(argv)

  lines = []

  def emit(d):
    lines.append(json.dumps(d))
    print(lines[-1], flush=True)

  emit(machine())
  # A fresh batch for every step: on random tokens the loss then stays near ln(256) instead of falling as the
  # model memorises a few repeated batches, so every round does the same work (no drift into denormals).
  batches = make_batches(args.batch, args.length, args.warmup + args.steps * args.repeats)
  alt = AltbenchCase(batches)
  hf = TorchCase(batches, ffn_dim=alt.cfg.ffn_dim)
  print(f"# params: altbench {alt.params:,}  hf_torch {hf.params:,}", file=sys.stderr, flush=True)
  if alt.params != hf.params:
    print("# WARNING: parameter counts differ", file=sys.stderr)
  retries = 2 * args.repeats if args.retries < 0 else args.retries
  res = benchmark([alt, hf], args.steps, args.repeats, args.warmup, emit, args.wait_idle, retries)
  a, t = res["altbench"], res["hf_torch"]
  emit({"bench": "train_throughput", "ratio": round(a["tokens_per_s"] / t["tokens_per_s"], 3), "target": 1.5,
        "ratio_min": round(t["step_ms_min"] / a["step_ms_min"], 3),
        "ratio_cpu_time": round(t["cpu_ms_per_step"] / a["cpu_ms_per_step"], 3),
        "quiet_rounds": {k: f"{v['quiet_rounds']}/{args.repeats}" for k, v in res.items()},
        "params": {"altbench": alt.params, "hf_torch": hf.params}, "params_equal": alt.params == hf.params,
        "loss_first": {"altbench": a["loss_first"], "hf_torch": t["loss_first"], "ln_vocab": round(math.log(VOCAB), 4)}})
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
