"""Length scaling of the SSD scan (kernels.ssd, chunked XLA path) against causal attention.

What it measures
  Forward + backward time of one op at a fixed batch for sequence lengths L (default 1K, 2K, 4K,
  8K), with the same batch, heads and head size for both ops:

  * ssd: `kernels.ssd(x, dt, A, B, C, chunk, dt_softplus=True, impl="xla")` with x (b, L, h, p),
    one group of B, C (b, L, 1, n). Its work is linear in L, so time(8K) / time(1K) should be
    about 8 (the target is <= 9).
  * attention: `kernels.attention(q, k, v, causal=True, impl="xla")` with q, k, v (b, L, h, p).
    It materialises (L, L) scores, so its work, time and memory grow as L^2 (ratio about 64).
    If `kernels.attention` cannot be imported, or the scores would need more memory than
    --attn-max-gb, that case is skipped with a note in the JSON.

  The timed function is jax.jit(jax.grad(loss)) with loss = sum(out * fixed random cotangent), with
  gradients w.r.t. every float input. Each case is compiled and run once (warmup), then timed
  --repeats times (fewer if a case exceeds --budget-s seconds), each run ending with
  block_until_ready; the reported time is the minimum, the least disturbed by other load.

How to read it
  One JSON line per case: {"op", "L", "ms", "ms_per_token", "repeats"}, where ms_per_token = ms /
  (b * L). A line {"op": "ssd_reference_vs_xla", ...} compares the token-by-token lax.scan
  reference with the chunked path at --ref-len. The last line has "ratio_8k_1k" (or, for other
  --lengths, the longest over the shortest) for ssd and attention.

  python experiments/bench/ssd_scaling.py [--b 2 --h 4 --p 32 --n 32 --chunk 64]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels.ssd import ssd  # noqa: E402


def time_fwd_bwd(fn, args, repeats, budget_s):
  """Min wall time in ms of fn(*args) over up to `repeats` runs after one warmup (compile) run."""
  jax.block_until_ready(fn(*args))
  times, start = [], time.perf_counter()
  while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * min(times), len(times)


def grad_of_weighted_sum(op, n_args):
  """jit(grad) of sum(op(*args) * cotangent) w.r.t. the first n_args arguments."""
  def loss(*args):
    *inputs, cotangent = args
    return jnp.sum(op(*inputs).astype(jnp.float32) * cotangent)
  return jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))


def ssd_case(b, length, h, p, n, chunk, impl, rng):
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  args = (f32(rng.standard_normal((b, length, h, p))), f32(rng.standard_normal((b, length, h))),
          f32(-np.exp(rng.uniform(-1, 1, h))), f32(0.5 * rng.standard_normal((b, length, 1, n))),
          f32(0.5 * rng.standard_normal((b, length, 1, n))), f32(rng.standard_normal((b, length, h, p))))
  op = lambda x, dt, A, B, C: ssd(x, dt, A, B, C, chunk, dt_softplus=True, impl=impl)
  return grad_of_weighted_sum(op, 5), args


def attention_case(attention, b, length, h, p, rng):
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  args = tuple(f32(rng.standard_normal((b, length, h, p))) for _ in range(4))
  op = lambda q, k, v: attention(q, k, v, causal=True, impl="xla")
  return grad_of_weighted_sum(op, 3), args


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--b", type=int, default=2)
  parser.add_argument("--h", type=int, default=4)
  parser.add_argument("--p", type=int, default=32, help="head size (headdim), also attention's")
  parser.add_argument("--n", type=int, default=32, help="SSD state size (dstate)")
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--lengths", default="1024,2048,4096,8192")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--budget-s", type=float, default=10.0, help="stop repeating a case after this long")
  parser.add_argument("--ref-len", type=int, default=1024, help="length for the reference-vs-xla line")
  parser.add_argument("--attn-max-gb", type=float, default=4.0,
                      help="skip attention where one float32 (b, h, L, L) score tensor exceeds this")
  parser.add_argument("--no-attention", action="store_true")
  args = parser.parse_args()
  lengths = [int(s) for s in args.lengths.split(",")]
  rng = np.random.default_rng(0)
  emit = lambda d: print(json.dumps(d), flush=True)
  emit({"config": dict(b=args.b, h=args.h, p=args.p, n=args.n, chunk=args.chunk, repeats=args.repeats,
                       backend=jax.default_backend(), devices=len(jax.devices()),
                       xla_flags=os.environ.get("XLA_FLAGS", ""))})

  attention, attention_note = None, None
  if args.no_attention:
    attention_note = "skipped: --no-attention"
  else:
    try:
      from kernels.attention import attention
    except ImportError as e:  # another engineer's module; the SSD numbers stand on their own
      attention_note = f"skipped: kernels.attention not importable ({e})"

  ms = {"ssd": {}, "attention": {}}
  for length in lengths:
    fn, fargs = ssd_case(args.b, length, args.h, args.p, args.n, args.chunk, "xla", rng)
    t, reps = time_fwd_bwd(fn, fargs, args.repeats, args.budget_s)
    ms["ssd"][length] = t
    emit({"op": "ssd", "L": length, "ms": round(t, 3), "ms_per_token": t / (args.b * length),
          "repeats": reps})
  for length in lengths:
    if attention is None:
      emit({"op": "attention", "L": length, "ms": None, "note": attention_note})
      continue
    scores_gb = args.b * args.h * length * length * 4 / 2**30
    if scores_gb > args.attn_max_gb:
      emit({"op": "attention", "L": length, "ms": None,
            "note": f"skipped: scores need {scores_gb:.1f} GiB > --attn-max-gb {args.attn_max_gb}"})
      continue
    fn, fargs = attention_case(attention, args.b, length, args.h, args.p, rng)
    t, reps = time_fwd_bwd(fn, fargs, args.repeats, args.budget_s)
    ms["attention"][length] = t
    emit({"op": "attention", "L": length, "ms": round(t, 3), "ms_per_token": t / (args.b * length),
          "repeats": reps})

  ref_fn, ref_args = ssd_case(args.b, args.ref_len, args.h, args.p, args.n, args.chunk, "reference", rng)
  xla_fn, _ = ssd_case(args.b, args.ref_len, args.h, args.p, args.n, args.chunk, "xla", rng)
  t_ref, _ = time_fwd_bwd(ref_fn, ref_args, args.repeats, args.budget_s)
  t_xla, _ = time_fwd_bwd(xla_fn, ref_args, args.repeats, args.budget_s)
  emit({"op": "ssd_reference_vs_xla", "L": args.ref_len, "reference_ms": round(t_ref, 3),
        "xla_ms": round(t_xla, 3), "ratio": round(t_ref / t_xla, 2)})

  lo, hi = min(lengths), max(lengths)
  ratio = lambda d: round(d[hi] / d[lo], 2) if lo in d and hi in d else None
  key = "ratio_8k_1k" if (lo, hi) == (1024, 8192) else f"ratio_{hi}_{lo}"
  emit({key: {"ssd": ratio(ms["ssd"]), "attention": ratio(ms["attention"])}, "ssd_target": "<= 9",
        **({"attention_note": attention_note} if attention_note else {})})


if __name__ == "__main__":
  main()
