"""Training throughput: altbench's transformer (JAX/XLA) against Hugging Face LlamaForCausalLM (PyTorch).

What it measures
  Both frameworks train the same model in one process, on the CPU, side by side: a Llama-style
  decoder with d_model 256, 4 layers, 4 heads of 64 (no GQA), SwiGLU of width `lm.Config().ffn_dim`
  (704), vocabulary 256, RMSNorm eps 1e-5, RoPE theta 1e4, untied embeddings, float32 everywhere,
  AdamW (lr 1e-3, betas (0.9, 0.95), weight decay 0.1 on matrices only, eps 1e-8), global-norm
  clipping at 1.0. A step is forward + backward + clip + AdamW update on one (batch, length) batch
  of random byte tokens.

  * altbench: the real train step (`train.step.make_optimizer`, `init_state`, `make_train_step`
    with a `train.config.TrainConfig`), `jax.jit(..., donate_argnums=0)`, batches shaped
    (grad_accum=1, batch, length) with inputs/targets/segment_ids/loss_mask/nbytes, as
    `train.loop` feeds it. The schedule is made flat (warmup 0, a huge step count), so lr is 1e-3.
  * hf_torch: `transformers.LlamaForCausalLM` in eager mode with its default attention ("sdpa"),
    cross-entropy on the logits, `clip_grad_norm_`, `torch.optim.AdamW` (defaults otherwise).

  Batches are made once, before timing, so data loading is not measured. Each framework is warmed
  up first (for JAX this is the XLA compile). Then `--repeats` rounds alternate the frameworks (the
  order flips every round, so background load hits both alike); a round times `--steps` steps,
  ending with `block_until_ready` (JAX dispatches asynchronously; torch on the CPU is synchronous
  and its loss is read back with `.item()`). Reported step time is the median over rounds.

Threads
  torch.set_num_threads(os.cpu_count()). XLA:CPU sizes its intra-op (Eigen) pool to the machine's
  cores by default; XLA_FLAGS from the environment, if any, are reported in the "xla_flags" field.

How to read it
  One JSON line per implementation: tokens_per_s = batch * length / median step time, step_ms the
  median step in milliseconds, params the parameter count (the two must be equal), loss_first
  the loss of the first step (both should be near ln(256) = 5.545), and step_ms_all every round.
  The last line has "ratio" = altbench tokens/s / hf_torch tokens/s (> 1: altbench is faster).
  Numbers are for this machine only; compare ratios, not absolute speeds, across machines.

  python experiments/bench/train_throughput.py --steps 10 --repeats 5 --out experiments/results/x.json
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from archs import lm  # noqa: E402
from train import step as train_step  # noqa: E402
from train.config import TrainConfig  # noqa: E402

D_MODEL, N_LAYERS, N_HEADS, VOCAB = 256, 4, 4, 256
LR, B1, B2, WEIGHT_DECAY, EPS, GRAD_CLIP = 1e-3, 0.9, 0.95, 0.1, 1e-8, 1.0
NORM_EPS, ROPE_THETA, SEED = 1e-5, 10000.0, 0
N_BATCHES = 4  # distinct batches cycled through while timing


def model_config(**overrides):
  return lm.Config(pattern="A" * N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS, n_kv_heads=0, vocab_size=VOCAB,
                   norm_eps=NORM_EPS, rope_theta=ROPE_THETA, tie_embeddings=False, dtype="float32",
                   param_dtype="float32", **overrides)


def make_batches(batch, length, n=N_BATCHES, seed=SEED):
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
    self.threads = os.cpu_count()

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


def machine():
  import torch
  cpu_model = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    pass
  return {"bench": "train_throughput", "machine": {
      "processor": platform.processor(), "cpu_model": cpu_model, "machine": platform.machine(),
      "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None, "torch": torch.__version__,
      "transformers": __import__("transformers").__version__, "jax_device": str(jax.devices()[0]),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}}


def benchmark(cases, steps, repeats, warmup, emit):
  """Warm up each case, then alternate timed rounds; emit one result dict per case and the ratio line."""
  first = {}
  for case in cases:
    t0 = time.perf_counter()
    first[case.name] = case.run(1)
    warm = case.run(warmup - 1) if warmup > 1 else first[case.name]
    print(f"# {case.name}: warm-up {warmup} steps in {time.perf_counter() - t0:.1f}s, first loss "
          f"{first[case.name]:.4f} (ln {VOCAB} = {math.log(VOCAB):.4f}), loss after warm-up {warm:.4f}",
          file=sys.stderr, flush=True)
  times = {case.name: [] for case in cases}
  last = {}
  for r in range(repeats):
    for case in (cases if r % 2 == 0 else cases[::-1]):
      t0 = time.perf_counter()
      last[case.name] = case.run(steps)
      times[case.name].append((time.perf_counter() - t0) / steps)
  load = [round(x, 2) for x in os.getloadavg()]
  results = {}
  for case in cases:
    b, l = case.batches[0][0].shape if isinstance(case.batches[0], tuple) else case.batches[0]["inputs"].shape[1:]
    step_s = statistics.median(times[case.name])
    device = (f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}" if case.name.startswith("altbench")
              else "cpu:torch")
    results[case.name] = {
        "bench": "train_throughput", "impl": case.name, "tokens_per_s": round(b * l / step_s, 1),
        "step_ms": round(step_s * 1e3, 2), "params": case.params, "threads": case.threads, "device": device,
        "batch": b, "length": l, "steps": steps, "repeats": repeats, "loss_first": round(first[case.name], 4),
        "loss_last": round(last[case.name], 4), "step_ms_all": [round(t * 1e3, 2) for t in times[case.name]],
        "loadavg_at_end": load,
        **({"xla_flags": os.environ.get("XLA_FLAGS", "")} if case.name.startswith("altbench") else
           {"torch_threads": case.torch.get_num_threads()})}
    emit(results[case.name])
  return results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=10, help="timed steps per round")
  p.add_argument("--repeats", type=int, default=5, help="timed rounds per framework (median reported)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--out", default="", help="also write the JSON lines (machine line first) to this file")
  args = p.parse_args(argv)

  lines = []

  def emit(d):
    lines.append(json.dumps(d))
    print(lines[-1], flush=True)

  emit(machine())
  batches = make_batches(args.batch, args.length)
  alt = AltbenchCase(batches)
  hf = TorchCase(batches, ffn_dim=alt.cfg.ffn_dim)
  print(f"# params: altbench {alt.params:,}  hf_torch {hf.params:,}", file=sys.stderr, flush=True)
  if alt.params != hf.params:
    print("# WARNING: parameter counts differ", file=sys.stderr)
  res = benchmark([alt, hf], args.steps, args.repeats, args.warmup, emit)
  emit({"bench": "train_throughput", "ratio": round(res["altbench"]["tokens_per_s"] /
                                                     res["hf_torch"]["tokens_per_s"], 3),
        "target": 1.5, "params_equal": alt.params == hf.params})
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
