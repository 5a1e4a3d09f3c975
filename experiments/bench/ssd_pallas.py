"""SSD scan speed: our Pallas kernels (kernels/ssd_pallas*.py) against our chunked XLA path.

What it measures
  For each sequence length L (default 2K, 4K, 8K, 16K) and chunk size (default 64, 128, 256), bf16
  inputs x (b, L, h, p), dt (b, L, h), A (h,), B, C (b, L, g, n), D (h,), z (b, L, h, p),
  dt_bias (h,), initial_states (b, h, p, n), dt_softplus=True, return_final_states=True, with
  b=8, h=32, p=64, g=1, n=128 by default (a Mamba-2 layer of width 2048), the time of
    * "fwd+bwd": jax.jit(jax.grad(loss)) w.r.t. x, dt, A, B, C, D, z, dt_bias, initial_states, with
                 loss = <y, fixed cotangent> + sum(final_states), and
    * "fwd":     jax.jit(ssd)  (add with --modes fwd+bwd,fwd),
  for impl="pallas" and impl="xla" of kernels.ssd. Each case is compiled and run once, then timed
  --repeats times (each run ends with block_until_ready); the reported time is the minimum.
  A case that fails (e.g. the XLA path running out of memory at 16K: it materialises (chunk x chunk)
  float32 tensors per head) is reported as skipped with the error, and the sweep goes on.

FLOPs (a convention, so that numbers compare across chunk sizes; time ratios do not depend on it)
  forward = b * L * h * (Q * (n + p) + 4 * p * n): per head and chunk of Q, the causal halves of the
  intra-chunk C B^T (Q^2 n) and (C B^T o decay) X (Q^2 p) products, plus the chunk-state and
  state-to-output products (2 * Q p n), at 2 FLOPs per multiply-add; backward = 2 * forward;
  "fwd+bwd" = 3 * forward. TFLOP/s = FLOPs / time.

How to read it
  One JSON line per (L, chunk, mode, impl): {"L", "chunk", "b", "h", "p", "n", "g", "mode", "impl",
  "ms", "tflops", "us_per_token" (= ms * 1e3 / (b * L): flat in L for a linear-time op),
  "compile_s", "max_abs_diff", "rel_diff"} where max_abs_diff is the forward output's largest deviation from
  the pallas output and rel_diff = ||out - pallas|| / ||pallas|| (bf16 rounding level, ~1e-2, expected),
  or {"impl", "skipped": reason}. Then one line per (L, chunk, mode) with "xla_over_pallas" = ms_xla /
  ms_pallas (> 1 where the kernels are faster; the target is >= 1.5 at L >= 4K on a GPU), and at the end
  one "summary" line with the best chunk per (L, impl).

  python experiments/bench/ssd_pallas.py [--lengths 2048,4096 --chunks 128,256 --modes fwd+bwd,fwd]
  python experiments/bench/ssd_pallas.py --b 1 --h 24 --lengths 4096 --dtype float32 --docs 1
                                         # the 124M hybrid's layer, as its float32 conv output fed it
  python experiments/bench/ssd_pallas.py --blocks 64,64,32,4,4,2   # GPU tiles: block_m, block_k,
                                                                   # block_p, heads, warps, stages

On a CPU backend the Pallas kernels only run in interpret mode (far too slow to time): the script
then runs a tiny configuration of the xla path only, and says so.
"""

import argparse
import dataclasses
import importlib
import json
import time


import jax
import jax.numpy as jnp
import numpy as np

ssd_module = importlib.import_module("altbench.kernels.ssd")  # the module (kernels.ssd is also a function)
from altbench.kernels import ssd_pallas

IMPLS = ("pallas", "xla")
FLOP_FORMULA = ("fwd = b*L*h*(Q*(n+p) + 4*p*n) (causal halves of C B^T and (C B^T o decay) X per "
                "chunk of Q, chunk-state and state-output products; 2 FLOPs per multiply-add); "
                "bwd = 2*fwd; fwd+bwd = 3*fwd")


def flops(b, length, h, p, n, q, mode):
  fwd = b * length * h * (q * (n + p) + 4 * p * n)
  return fwd if mode == "fwd" else 3 * fwd


def time_ms(fn, args, repeats):
  """(min wall time in ms over `repeats` runs, seconds of the first (compiling) run)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * min(times), compile_s


def make_inputs(b, length, h, p, g, n, dtype="bfloat16", docs=0, seed=0):
  """The op's arguments (activations in `dtype`, parameters float32) and a fixed output cotangent; with
  docs > 0, seq_idx packs `docs` equal-length documents into every row."""
  rng = np.random.default_rng(seed)
  act = lambda shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), dtype)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  args = dict(x=act((b, length, h, p)), dt=act((b, length, h)), A=f32(-np.exp(rng.uniform(-1, 1, h))),
              B=act((b, length, g, n), 0.5), C=act((b, length, g, n), 0.5), D=f32(rng.standard_normal(h)),
              z=act((b, length, h, p)), dt_bias=f32(0.5 * rng.standard_normal(h)),
              initial_states=f32(0.5 * rng.standard_normal((b, h, p, n))),
              seq_idx=(jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) * docs // length, (b, length))
                       if docs else None))
  cot = jnp.asarray(rng.standard_normal((b, length, h, p)), jnp.float32)
  return args, cot


NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def build(impl, chunk, mode, cot, blocks, seq_idx=None):
  def op(x, dt, A, B, C, D, z, dt_bias, initial_states):
    kw = dict(D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, dt_softplus=True,
              return_final_states=True, seq_idx=seq_idx)
    if impl == "pallas" and blocks is not None:
      return ssd_pallas.ssd_pallas(x, dt, A, B, C, chunk, block_sizes=blocks, **kw)
    return ssd_module.ssd(x, dt, A, B, C, chunk, impl=impl, **kw)

  if mode == "fwd":
    return jax.jit(op), jax.jit(lambda *a: op(*a)[0])

  def loss(*a):
    y, final = op(*a)
    return jnp.sum(y.astype(jnp.float32) * cot) + jnp.sum(final)

  return jax.jit(jax.grad(loss, argnums=tuple(range(len(NAMES))))), jax.jit(lambda *a: op(*a)[0])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="2048,4096,8192,16384")
  parser.add_argument("--chunks", default="64,128,256")
  parser.add_argument("--modes", default="fwd+bwd")
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--b", type=int, default=8)
  parser.add_argument("--h", type=int, default=32)
  parser.add_argument("--p", type=int, default=64)
  parser.add_argument("--n", type=int, default=128)
  parser.add_argument("--g", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="dtype of x, dt, B, C, z (float32 runs the kernels' dots at HIGHEST precision)")
  parser.add_argument("--docs", type=int, default=0, help="documents packed per row through seq_idx (0: none)")
  parser.add_argument("--blocks", default="", help="GPU BlockSizes fields, comma-separated "
                      "(block_m,block_k,block_p,heads,num_warps,num_stages); default: per call")
  args = parser.parse_args()
  emit = lambda d: print(json.dumps(d), flush=True)
  backend = jax.default_backend()
  lengths = [int(v) for v in args.lengths.split(",")]
  chunks = [int(v) for v in args.chunks.split(",")]
  impls = args.impls.split(",")
  modes = args.modes.split(",")
  blocks = ssd_pallas.BlockSizes(*[int(v) for v in args.blocks.split(",")]) if args.blocks else None
  if backend == "cpu":
    lengths, chunks, impls, args.repeats = [512], [64], ["xla"], 2
    args.b, args.h, args.p, args.n = 1, 4, 16, 16
    emit({"note": "CPU backend: the Pallas kernels would run in interpret mode (too slow to time); "
                  "running a tiny xla-only configuration to exercise the script"})
  emit({"config": dict(backend=backend, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                       dtype=args.dtype, docs=args.docs, b=args.b, h=args.h, p=args.p, n=args.n, g=args.g,
                       repeats=args.repeats, impls=impls, modes=modes, chunks=chunks,
                       blocks=None if blocks is None else dataclasses.asdict(blocks)),
        "flop_formula": FLOP_FORMULA})

  best = {}
  for length in lengths:
    inputs, cot = make_inputs(args.b, length, args.h, args.p, args.g, args.n, args.dtype, args.docs)
    arg_list = [inputs[k] for k in NAMES]
    for chunk in chunks:
      base = {"L": length, "chunk": chunk, "b": args.b, "h": args.h, "p": args.p, "n": args.n, "g": args.g}
      for mode in modes:
        ms, ref_out = {}, None
        for impl in impls:
          line = {**base, "mode": mode, "impl": impl}
          try:
            fn, fwd_fn = build(impl, chunk, mode, cot, blocks, inputs["seq_idx"])
            t, compile_s = time_ms(fn, arg_list, args.repeats)
            out = fwd_fn(*arg_list).astype(jnp.float32)
            diff = rel = None
            if ref_out is None:
              ref_out = out
            else:
              diff = float(jnp.max(jnp.abs(out - ref_out)))
              rel = float(jnp.linalg.norm(out - ref_out) / jnp.linalg.norm(ref_out))
            del out
          except Exception as e:  # noqa: BLE001 - report and go on with the other cases
            emit({**line, "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
          ms[impl] = t
          key = (length, impl, mode)
          if key not in best or t < best[key][1]:
            best[key] = (chunk, t)
          emit({**line, "ms": round(t, 3),
                "tflops": round(flops(args.b, length, args.h, args.p, args.n, chunk, mode) / t / 1e9, 2),
                "us_per_token": round(t * 1e3 / (args.b * length), 5), "compile_s": round(compile_s, 1),
                "max_abs_diff": diff, "rel_diff": rel})
        if "pallas" in ms and "xla" in ms:
          emit({**base, "mode": mode, "xla_over_pallas": round(ms["xla"] / ms["pallas"], 3)})
  emit({"summary": [{"L": k[0], "impl": k[1], "mode": k[2], "best_chunk": v[0], "ms": round(v[1], 3),
                     "us_per_token": round(v[1] * 1e3 / (args.b * k[0]), 5)} for k, v in sorted(best.items())]})


if __name__ == "__main__":
  main()
