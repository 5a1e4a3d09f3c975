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
  gradients w.r.t. every float input. Each case is compiled and run once (warmup), then the cases
  of one op are timed in --repeats interleaved rounds (a case stops early once its runs exceed
  --budget-s seconds), each run ending with block_until_ready; the reported time is the minimum,
  the least disturbed by other load on the machine.

How to read it
  One JSON line per case: {"op", "L", "ms", "ms_per_token", "repeats"}, where ms_per_token = ms /
  (b * L). A line {"op": "ssd_reference_vs_xla", ...} compares the token-by-token lax.scan
  reference with the chunked path at --ref-len. The last line has "ratio": time at the longest L
  over time at the shortest (8K / 1K by default) for ssd and attention.

  python experiments/bench/ssd_scaling.py [--b 2 --h 4 --p 32 --n 32 --chunk 64]
"""

import argparse
import json
import os
import time


import jax
import jax.numpy as jnp
import numpy as np

from altbench.kernels.attention import attention as attention_op
from altbench.kernels.ssd import ssd


def time_interleaved(cases, repeats, budget_s):
  """Min wall ms per case over up to `repeats` rounds, after one warmup (compile) run of each.

  Each round runs every case once, so load from other processes that comes and goes hits all
  cases alike and the ratios between them stay meaningful. A case stops repeating once its
  timed runs add up to budget_s. Returns {name: (min_ms, runs)}.
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


def grad_of_weighted_sum(op, n_args):
  """jit(grad) of sum(op(*args) * cotangent) w.r.t. the first n_args arguments."""
  def loss(*args):
    *inputs, cotangent = args
    return jnp.sum(op(*inputs).astype(jnp.float32) * cotangent)
  return jax.jit(jax.grad(loss, argnums=tuple(range(n_args))))


def ssd_case(ssd, b, length, h, p, n, chunk, impl, rng):
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
  parser.add_argument("--attn-max-gb", type=float, default=1.0,
                      help="skip attention where one float32 (b, h, L, L) score tensor exceeds this many "
                           "GiB; the backward pass peaks at about 8x that (default: 8K is skipped)")
  parser.add_argument("--no-attention", action="store_true")
  args = parser.parse_args()
  lengths = [int(s) for s in args.lengths.split(",")]
  rng = np.random.default_rng(0)
  emit = lambda d: print(json.dumps(d), flush=True)
  emit({"config": dict(b=args.b, h=args.h, p=args.p, n=args.n, chunk=args.chunk, repeats=args.repeats,
                       backend=jax.default_backend(), devices=len(jax.devices()),
                       xla_flags=os.environ.get("XLA_FLAGS", ""))})

  attention, attention_note = (None, "skipped: --no-attention") if args.no_attention else (attention_op, None)

  ms = {"ssd": {}, "attention": {}}
  cases = {length: ssd_case(ssd, args.b, length, args.h, args.p, args.n, args.chunk, "xla", rng)
           for length in lengths}
  for length, (t, runs) in time_interleaved(cases, args.repeats, args.budget_s).items():
    ms["ssd"][length] = t
    emit({"op": "ssd", "L": length, "ms": round(t, 3), "ms_per_token": round(t / (args.b * length), 6),
          "repeats": runs})

  cases, skipped = {}, {}
  for length in lengths:
    scores_gb = args.b * args.h * length * length * 4 / 2**30
    if attention is None:
      skipped[length] = attention_note
    elif scores_gb > args.attn_max_gb:
      skipped[length] = f"skipped: scores need {scores_gb:.3g} GiB > --attn-max-gb {args.attn_max_gb}"
    else:
      cases[length] = attention_case(attention, args.b, length, args.h, args.p, rng)
  timed = time_interleaved(cases, args.repeats, args.budget_s)
  for length in lengths:
    if length in skipped:
      emit({"op": "attention", "L": length, "ms": None, "note": skipped[length]})
      continue
    t, runs = timed[length]
    ms["attention"][length] = t
    emit({"op": "attention", "L": length, "ms": round(t, 3), "ms_per_token": round(t / (args.b * length), 6),
          "repeats": runs})
  del cases

  ref_fn, ref_args = ssd_case(ssd, args.b, args.ref_len, args.h, args.p, args.n, args.chunk, "reference", rng)
  xla_fn, _ = ssd_case(ssd, args.b, args.ref_len, args.h, args.p, args.n, args.chunk, "xla", rng)
  timed = time_interleaved({"reference": (ref_fn, ref_args), "xla": (xla_fn, ref_args)}, args.repeats,
                           args.budget_s)
  t_ref, t_xla = timed["reference"][0], timed["xla"][0]
  emit({"op": "ssd_reference_vs_xla", "L": args.ref_len, "reference_ms": round(t_ref, 3),
        "xla_ms": round(t_xla, 3), "ratio": round(t_ref / t_xla, 2)})

  # time(longest L) / time(shortest L) per op. Where attention skipped the longest lengths, its
  # ratio over the lengths it did run is added, next to the length-squared ratio.
  lo, hi = min(lengths), max(lengths)
  ratio = lambda d, a, b: round(d[b] / d[a], 2) if a in d and b in d else None
  summary = {"ratio": {"ssd": ratio(ms["ssd"], lo, hi), "attention": ratio(ms["attention"], lo, hi)},
             "L": [lo, hi], "ssd_target": "<= 9 (linear in L)"}
  attn_hi = max(ms["attention"], default=None)
  if attn_hi is not None and lo < attn_hi < hi and lo in ms["attention"]:
    summary["attention_measured"] = {"L": [lo, attn_hi], "ratio": ratio(ms["attention"], lo, attn_hi),
                                     "length_squared_ratio": (attn_hi / lo) ** 2}
  if attention_note:
    summary["attention_note"] = attention_note
  emit(summary)


if __name__ == "__main__":
  main()
