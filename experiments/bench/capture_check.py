"""interp.capture on the backend's fast kernels (Pallas flash attention and SSD on a GPU): values and costs.

Checks, for an "AMP" lm (attention, Mamba-2 and parallel blocks) at a length where impl="auto" picks the
Pallas kernels on a GPU, one JSON line each:
  values    run_with_cache's output against model() (the same kernels), the logit lens of the last residual
            against the output, and self-patches (each block's attention pattern and SSM states replaced by
            their own values, which recomputes pattern @ v and C h + D x from them) against the output: max
            abs differences; they show that the reference-computed pattern and states are the ones the
            fast kernels use
  capture   ms of the jitted forward, of run_with_cache with the residual streams, and with every name
  train     the jit train step lowered with the taps as they are and with them stubbed out: equal StableHLO
            text, XLA FLOPs, and step ms of each, interleaved (the same program, so equal up to noise)

  python experiments/bench/capture_check.py [--d-model 512 --length 1024 --batch 8 --repeats 20]
"""

import argparse
import json
import time


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altbench import archs
from altbench.archs import hooks, lm
from altbench.interp import capture, lens
from altbench.train import step as train_step
from altbench.train.config import TrainConfig


def timed(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return round(1000 * float(np.median(times)), 3)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--d-model", type=int, default=512)
  ap.add_argument("--length", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=20)
  args = ap.parse_args()
  d, l, b = args.d_model, args.length, args.batch
  cfg = lm.Config(pattern="AMPA", d_model=d, n_heads=d // 64, vocab_size=512, d_state=64, ssm_headdim=64,
                  chunk_size=128 if jax.default_backend() != "cpu" else 64)
  print(json.dumps({"backend": jax.default_backend(), "device": str(jax.devices()[0]), "d_model": d, "length": l,
                    "batch": b, "pattern": cfg.pattern}), flush=True)
  model = lm.build(cfg, nnx.Rngs(0))
  x = jax.random.randint(jax.random.key(1), (b, l), 0, cfg.vocab_size)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
  ref = forward(state, x)
  out, cache = capture.run_with_cache(model, x)
  last = f"blocks.{len(cfg.pattern) - 1}.resid_post"
  own = {n: v for n, v in cache.items() if n.endswith(("attn.pattern", "ssm.state"))}
  patched = capture.run_with_patches(model, x, own)
  scale = float(jnp.abs(ref).max())
  print(json.dumps({"check": "values", "logit_scale": scale,
                    "out_vs_model": float(jnp.abs(out - ref).max()),
                    "lens_last_vs_out": float(jnp.abs(lens.logit_lens(model, cache[last]) - out).max()),
                    "self_patched_vs_out": float(jnp.abs(patched - out).max()), "patched": sorted(own)}), flush=True)
  del cache, own
  resid = ["embed", "blocks.*.resid_post"]
  print(json.dumps({"check": "capture", "forward_ms": timed(lambda: forward(state, x), args.repeats),
                    "resid_streams_ms": timed(lambda: capture.run_with_cache(model, x, names=resid), args.repeats),
                    "every_name_ms": timed(lambda: capture.run_with_cache(model, x), args.repeats)}), flush=True)

  family = archs.get_family("lm")
  tcfg = TrainConfig(steps=100, warmup_steps=1)
  tx = train_step.make_optimizer(tcfg)
  graphdef, tstate = train_step.init_state(family, cfg, tx, 0)
  xs = np.asarray(x)[None]
  ones = np.ones_like(xs)
  batch = {"inputs": xs, "targets": xs, "segment_ids": ones, "loss_mask": ones, "nbytes": ones}

  def build():
    fn = jax.jit(train_step.make_train_step(family, graphdef, tx, tcfg))
    low = fn.lower(tstate, batch, jax.random.key(0))
    return low, low.compile()

  low_real, real = build()
  saved = hooks.tap, hooks.wants, hooks.replaces
  hooks.tap, hooks.wants, hooks.replaces = (lambda m, n, v: v), (lambda m, n: False), (lambda m, n: False)
  try:
    low_stub, stub = build()
  finally:
    hooks.tap, hooks.wants, hooks.replaces = saved
  flops = lambda c: (c[0] if isinstance(c, (list, tuple)) else c)["flops"]
  times = {"real": [], "stub": []}
  for _ in range(3):  # interleaved, so drift on the machine hits both
    for name, fn in (("real", real), ("stub", stub)):
      times[name].append(timed(lambda: fn(tstate, batch, jax.random.key(0)), max(3, args.repeats // 3)))
  print(json.dumps({"check": "train", "same_stablehlo": low_real.as_text() == low_stub.as_text(),
                    "flops_real": flops(real.cost_analysis()), "flops_stub": flops(stub.cost_analysis()),
                    "step_ms_real": times["real"], "step_ms_stub": times["stub"]}), flush=True)


if __name__ == "__main__":
  main()
