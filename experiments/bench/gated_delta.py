"""Length scaling of the gated delta rule (kernels.gated_delta): the chunked XLA path, and the reference.

What it measures
  Forward + backward time of `kernels.gated_delta(q, k, v, g, beta, chunk_size=--chunk, impl="xla")` at a
  fixed batch for sequence lengths L (default 1K, 2K, 4K, 8K), with q, k (b, L, h, dk) (k L2-normalised,
  as a Gated DeltaNet layer feeds it), v (b, L, h, dv), g = -softplus(noise) <= 0, beta = sigmoid(noise).
  Its work is linear in L, so time(8K) / time(1K) should be about 8 (the target is <= 9).

  The timed function is jax.jit(jax.grad(loss)) with loss = sum(o * fixed random cotangent), with
  gradients w.r.t. q, k, v, g and beta. Each case is compiled and run once (warmup), then the cases are
  timed in --repeats interleaved rounds (a case stops early once its runs exceed --budget-s seconds), each
  run ending with block_until_ready; the reported time is the minimum, the least disturbed by other load.

How to read it
  One JSON line per case: {"op": "gated_delta_xla", "L", "ms", "ms_per_token", "repeats"}, where
  ms_per_token = ms / (b * L). Then, for each length in --ref-lengths, a line
  {"op": "gated_delta_reference_vs_xla", "L", "reference_ms", "xla_ms", "ratio"} comparing the
  token-by-token lax.scan reference with the chunked path (ratio = reference / xla). The last line has
  "ratio": time at the longest L over time at the shortest (8K / 1K by default) for the XLA path.

  Pallas vs XLA (--pallas, default on): forward + backward of impl="pallas" against impl="xla" on the same
  bf16 inputs, timed interleaved, one line per length {"op": "gated_delta_pallas_vs_xla", "device_kind",
  "target", "interpret", "L", "b", "h", "dk", "dv", "pallas_ms", "xla_ms", "ratio"} with ratio = xla / pallas
  (> 1: the kernels are faster). On a GPU or TPU at --pallas-lengths (default 4K and 16K) and the layer
  shape --pallas-shape (default b1 h16 dk = dv = 128); on CPU the kernels only run in Pallas interpret mode,
  so one tiny case (L 128, b1 h2 dk = dv = 32) is run instead, labelled "interpret": true: it checks that the
  path runs and says nothing about kernel speed.

  python experiments/bench/gated_delta.py [--b 2 --h 4 --dk 64 --dv 64 --chunk 64] [--pallas off]
  python experiments/bench/gated_delta.py --lengths 1024 --ref-lengths "" --pallas-shape 2,16,128,128
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from altbench.kernels import tuning
from altbench.kernels.gated_delta import gated_delta
from altbench.kernels.gated_delta_pallas import backend_target


def time_interleaved(cases, repeats, budget_s):
  """Min wall ms per case over up to `repeats` rounds, after one warmup (compile) run of each.

  Each round runs every case once, so load from other processes that comes and goes hits all cases alike
  and the ratios between them stay meaningful. A case stops repeating once its timed runs add up to
  budget_s. Returns {name: (min_ms, runs)}.
  """
  for fn, args in cases.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (fn, args) in cases.items():
      if times[name] and sum(times[name]) > budget_s:
        continue
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: (1e3 * min(t), len(t)) for name, t in times.items()}


def inputs(rng, b, length, h, dk, dv):
  """q, k, v, g, beta as a Gated DeltaNet layer makes them, and a cotangent for o."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  k = rng.standard_normal((b, length, h, dk))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  return (f32(rng.standard_normal((b, length, h, dk))), f32(k), f32(rng.standard_normal((b, length, h, dv))),
          f32(-np.logaddexp(0.0, rng.standard_normal((b, length, h)))),
          f32(1.0 / (1.0 + np.exp(-rng.standard_normal((b, length, h))))),
          f32(rng.standard_normal((b, length, h, dv))))


def fwd_bwd(impl, chunk):
  """jit(grad) of sum(gated_delta(q, k, v, g, beta) * cotangent) w.r.t. q, k, v, g, beta."""
  def loss(q, k, v, g, beta, cotangent):
    return jnp.sum(gated_delta(q, k, v, g, beta, chunk_size=chunk, impl=impl) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--b", type=int, default=2)
  parser.add_argument("--h", type=int, default=4)
  parser.add_argument("--dk", type=int, default=64)
  parser.add_argument("--dv", type=int, default=64)
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--lengths", default="1024,2048,4096,8192")
  parser.add_argument("--ref-lengths", default="256,1024", help="lengths for the reference-vs-xla lines")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--budget-s", type=float, default=10.0, help="stop repeating a case after this long")
  parser.add_argument("--pallas", choices=("on", "off"), default="on", help="the pallas-vs-xla lines")
  parser.add_argument("--pallas-lengths", default="4096,16384", help="lengths of the pallas-vs-xla lines")
  parser.add_argument("--pallas-shape", default="1,16,128,128", help="b,h,dk,dv of the pallas-vs-xla lines")
  args = parser.parse_args()
  lengths = [int(s) for s in args.lengths.split(",")]
  ref_lengths = [int(s) for s in args.ref_lengths.split(",") if s]
  rng = np.random.default_rng(0)
  emit = lambda d: print(json.dumps(d), flush=True)
  emit({"config": dict(b=args.b, h=args.h, dk=args.dk, dv=args.dv, chunk=args.chunk, repeats=args.repeats,
                       backend=jax.default_backend(), devices=len(jax.devices()),
                       xla_flags=os.environ.get("XLA_FLAGS", ""))})

  xla = fwd_bwd("xla", args.chunk)
  cases = {length: (xla, inputs(rng, args.b, length, args.h, args.dk, args.dv)) for length in lengths}
  ms = {}
  for length, (t, runs) in time_interleaved(cases, args.repeats, args.budget_s).items():
    ms[length] = t
    emit({"op": "gated_delta_xla", "L": length, "ms": round(t, 3), "ms_per_token": round(t / (args.b * length), 6),
          "repeats": runs})
  del cases

  reference = fwd_bwd("reference", args.chunk)
  for length in ref_lengths:
    case_args = inputs(rng, args.b, length, args.h, args.dk, args.dv)
    timed = time_interleaved({"reference": (reference, case_args), "xla": (xla, case_args)}, args.repeats,
                             args.budget_s)
    t_ref, t_xla = timed["reference"][0], timed["xla"][0]
    emit({"op": "gated_delta_reference_vs_xla", "L": length, "reference_ms": round(t_ref, 3),
          "xla_ms": round(t_xla, 3), "ratio": round(t_ref / t_xla, 2)})

  if args.pallas == "on":
    pallas_vs_xla(args, rng, emit)

  lo, hi = min(lengths), max(lengths)
  emit({"ratio": {"gated_delta_xla": round(ms[hi] / ms[lo], 2)}, "L": [lo, hi], "target": "<= 9 (linear in L)"})


def pallas_vs_xla(args, rng, emit):
  """impl="pallas" against impl="xla", fwd + bwd on bf16 inputs (module docstring)."""
  target = backend_target()
  interpret = target is None
  if interpret:  # CPU: a tiny interpret-mode case; it checks the path, not kernel speed
    lengths, (b, h, dk, dv) = [128], (1, 2, 32, 32)
  else:
    lengths = [int(s) for s in args.pallas_lengths.split(",") if s]
    b, h, dk, dv = (int(s) for s in args.pallas_shape.split(","))
  pallas, xla = fwd_bwd("pallas", args.chunk), fwd_bwd("xla", args.chunk)
  bf16 = lambda a: a.astype(jnp.bfloat16)
  for length in lengths:
    q, k, v, g, beta, cot = inputs(rng, b, length, h, dk, dv)
    case_args = (bf16(q), bf16(k), bf16(v), g, beta, cot)
    timed = time_interleaved({"pallas": (pallas, case_args), "xla": (xla, case_args)},
                             1 if interpret else args.repeats, args.budget_s)
    t_pallas, t_xla = timed["pallas"][0], timed["xla"][0]
    emit({"op": "gated_delta_pallas_vs_xla", "device_kind": tuning.device_kind(), "target": target or "gpu",
          "interpret": interpret, "L": length, "b": b, "h": h, "dk": dk, "dv": dv, "chunk": args.chunk,
          "dtype": "bfloat16", "pallas_ms": round(t_pallas, 3), "xla_ms": round(t_xla, 3),
          "ratio": round(t_xla / t_pallas, 3)})


if __name__ == "__main__":
  main()
