"""Causal attention speed: our Pallas flash kernels against cuDNN, jax's Pallas mha and our XLA path.

What it measures
  For each sequence length L (default 1K, 2K, 4K, 8K, 16K) and head dim d (default 64, 128), bf16,
  causal, MHA (kv heads = heads), with a fixed token budget per step (b = max(1, --tokens // L)) and
  a fixed model width (h = --width // d), the time of
    * "fwd+bwd": jax.jit(jax.grad(loss, (q, k, v))) with loss = sum(out * fixed cotangent), and
    * "fwd":     jax.jit(attention)  (add or drop with --modes),
  for these implementations:
    * pallas:     kernels.attention(..., impl="pallas")         (ours, kernels/flash_attention*.py)
    * cudnn:      kernels.attention(..., impl="cudnn"), i.e. jax.nn.dot_product_attention(...,
                  implementation="cudnn", is_causal=True): what impl="auto" runs where the tuning table
                  says cuDNN (`altbench bench kernels --tune` decides that per head_dim class)
    * jax_pallas: jax.experimental.pallas.ops.gpu.attention.mha (jax's own Triton kernels, default
                  block sizes; import guarded, skipped if absent or failing)
    * xla:        kernels.attention(..., impl="xla")            (materialises the (L, L) scores;
                  skipped where one (b, h, L, L) float32 score tensor exceeds --xla-max-gb)
  Each case is compiled and run once, then timed --repeats times (each run ends with
  block_until_ready); the reported time is the minimum.

FLOPs (FlashAttention-2's convention, so numbers compare with published ones)
  forward = 4 * b * h * L * L * d (two matmuls, 2 FLOPs per multiply-add), halved when causal;
  backward = 2.5 * forward (five matmuls, one of them the recomputation of q k^T); the "fwd+bwd"
  lines count forward + backward = 3.5 * forward. TFLOP/s = FLOPs / time. Time ratios do not depend
  on the convention.

How to read it
  One JSON line per (L, d, mode, impl): {"L", "d", "b", "h", "device_kind", "mode", "impl", "ms", "tflops",
  "max_abs_diff"} where max_abs_diff is the forward output's largest deviation from our pallas
  output (a sanity check, bf16 rounding level ~1e-2 expected), or {"impl", "skipped": reason}.
  Then one line per (L, d, mode) with "fastest" (the impl) and "ms_over_pallas": {impl: ms_impl /
  ms_pallas}, i.e. > 1 where ours is faster.

  python experiments/bench/attention.py [--lengths 1024,2048 --dims 64,128 --modes fwd+bwd,fwd]

--candidates (issue 26 part 4): instead, per (L, d), fwd+bwd only, our kernels with their default blocks
("default"), with each of flash_attention.GPU_CANDIDATES[d] (options of the same kernels, off by default),
and cuDNN: one line per candidate {"L", "d", "b", "h", "device_kind", "candidate", "options", "ms",
"over_default", "over_cudnn"} (time ratios; < 1 is faster), then {"fastest"}. A candidate that is faster
belongs in the tuning table: `altbench bench kernels --tune` chooses among the same candidates.

  python experiments/bench/attention.py --candidates [--lengths 1024,4096,16384 --dims 64,128]

On a CPU backend the Pallas kernels only run in interpret mode (far too slow to time) and cuDNN and
Triton are absent: the script then runs a tiny configuration of the xla path only, and says so.
"""

import argparse
import dataclasses
import json
import time


import jax
import jax.numpy as jnp
import numpy as np

from altbench.kernels import flash_attention as fa
from altbench.kernels.attention import attention

IMPLS = ("pallas", "cudnn", "jax_pallas", "xla")


def flops(b, h, length, d, causal, mode):
  fwd = 4 * b * h * length * length * d / (2 if causal else 1)
  return fwd if mode == "fwd" else 3.5 * fwd


def time_ms(fn, args, repeats):
  """Min wall time in ms over `repeats` runs after one warmup (compile) run."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * min(times)


def make_ops(scale):
  """impl -> (b, L, h, d) causal attention function, or impl -> reason it is unavailable."""
  ops = {
      "pallas": lambda q, k, v: attention(q, k, v, causal=True, softmax_scale=scale, impl="pallas"),
      "cudnn": lambda q, k, v: attention(q, k, v, causal=True, softmax_scale=scale, impl="cudnn"),
      "xla": lambda q, k, v: attention(q, k, v, causal=True, softmax_scale=scale, impl="xla"),
  }
  try:
    from jax.experimental.pallas.ops.gpu import attention as jax_gpu_attention
    ops["jax_pallas"] = lambda q, k, v: jax_gpu_attention.mha(q, k, v, segment_ids=None, sm_scale=scale,
                                                              causal=True)
  except Exception as e:  # noqa: BLE001 - any import problem just drops this comparison
    ops["jax_pallas"] = f"import failed: {type(e).__name__}: {e}"
  return ops


def build(op, mode, cot):
  if mode == "fwd":
    return jax.jit(op)
  loss = lambda q, k, v: jnp.sum(op(q, k, v).astype(jnp.float32) * cot)
  return jax.jit(jax.grad(loss, (0, 1, 2)))


def candidates(args, emit):
  """Time each GPU candidate of the flash kernels against the default blocks and cuDNN (fwd+bwd)."""
  kind = str(jax.devices()[0].device_kind)
  for d in [int(x) for x in args.dims.split(",")]:
    base_blocks = fa.default_block_sizes("gpu", d)
    ops = {"default": {}, **fa.GPU_CANDIDATES[fa.head_dim_class(d)]}
    for length in [int(x) for x in args.lengths.split(",")]:
      b, h = max(1, args.tokens // length), max(1, args.width // d)
      rng = np.random.default_rng(0)
      q, k, v = (jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.bfloat16) for _ in range(3))
      cot = jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.float32)
      base = {"L": length, "d": d, "b": b, "h": h, "device_kind": kind, "mode": "fwd+bwd"}
      ms = {}
      try:
        cudnn = lambda q, k, v: attention(q, k, v, causal=True, impl="cudnn")
        ms["cudnn"] = time_ms(build(cudnn, "fwd+bwd", cot), (q, k, v), args.repeats)
      except Exception as e:  # noqa: BLE001
        emit({**base, "candidate": "cudnn", "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
      for name, options in ops.items():
        bs = dataclasses.replace(base_blocks, **options)
        op = lambda q, k, v, bs=bs: fa.flash_attention(q, k, v, causal=True, block_sizes=bs)
        try:
          ms[name] = time_ms(build(op, "fwd+bwd", cot), (q, k, v), args.repeats)
        except Exception as e:  # noqa: BLE001 - a candidate that fails is reported, not fatal
          emit({**base, "candidate": name, "options": options, "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
          continue
        ratio = lambda other: round(ms[name] / ms[other], 3) if other in ms else None
        emit({**base, "candidate": name, "options": options, "ms": round(ms[name], 3),
              "over_default": ratio("default"), "over_cudnn": ratio("cudnn")})
      if ms:
        emit({**base, "fastest": min(ms, key=ms.get), "ms": {n: round(t, 3) for n, t in ms.items()}})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  parser.add_argument("--dims", default="64,128")
  parser.add_argument("--modes", default="fwd+bwd,fwd")
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--tokens", type=int, default=16384, help="b * L per step")
  parser.add_argument("--width", type=int, default=2048, help="h * d")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--xla-max-gb", type=float, default=8.0)
  parser.add_argument("--candidates", action="store_true", help="time flash_attention.GPU_CANDIDATES (GPU only)")
  args = parser.parse_args()
  emit = lambda d: print(json.dumps(d), flush=True)
  backend = jax.default_backend()
  if args.candidates:
    if backend != "gpu":
      emit({"note": f"--candidates needs a GPU (backend {backend}): the options are GPU kernel options"})
      return
    return candidates(args, emit)
  lengths = [int(x) for x in args.lengths.split(",")]
  dims = [int(x) for x in args.dims.split(",")]
  impls = args.impls.split(",")
  modes = args.modes.split(",")
  if backend == "cpu":
    lengths, dims, impls, args.tokens, args.width, args.repeats = [256], [64], ["xla"], 256, 128, 2
    emit({"note": "CPU backend: Pallas kernels would run in interpret mode (too slow to time), cuDNN "
                  "and Triton are unavailable; running a tiny xla-only configuration to exercise the "
                  "script"})
  emit({"config": dict(backend=backend, device=str(jax.devices()[0].device_kind), jax=jax.__version__,
                       dtype="bfloat16", causal=True, tokens=args.tokens, width=args.width,
                       repeats=args.repeats, impls=impls, modes=modes),
        "flop_formula": "fwd = 4*b*h*L*L*d/2 (causal); fwd+bwd = 3.5 * fwd (bwd = 2.5 * fwd)"})

  for d in dims:
    ops = make_ops(d ** -0.5)
    for length in lengths:
      b, h = max(1, args.tokens // length), max(1, args.width // d)
      rng = np.random.default_rng(0)
      q, k, v = (jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.bfloat16) for _ in range(3))
      cot = jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.float32)
      base = {"L": length, "d": d, "b": b, "h": h, "device_kind": str(jax.devices()[0].device_kind)}
      ref_out = None
      for mode in modes:
        ms = {}
        for impl in impls:
          op = ops.get(impl, f"unknown impl {impl!r}")
          line = {**base, "mode": mode, "impl": impl}
          if isinstance(op, str):
            emit({**line, "skipped": op})
            continue
          if impl == "xla" and b * h * length * length * 4 / 2**30 > args.xla_max_gb:
            emit({**line, "skipped": f"(b, h, L, L) float32 scores > --xla-max-gb {args.xla_max_gb}"})
            continue
          try:
            t = time_ms(build(op, mode, cot), (q, k, v), args.repeats)
            diff = None
            if mode == modes[0]:  # forward sanity check against ours, once per case
              out = jax.jit(op)(q, k, v).astype(jnp.float32)
              if impl == impls[0]:
                ref_out = out
              elif ref_out is not None:
                diff = float(jnp.max(jnp.abs(out - ref_out)))
          except Exception as e:  # noqa: BLE001 - report and go on with the other impls
            emit({**line, "skipped": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
          ms[impl] = t
          emit({**line, "ms": round(t, 3), "tflops": round(flops(b, h, length, d, True, mode) / t / 1e9, 2),
                "max_abs_diff": diff})
        if "pallas" in ms:
          emit({**base, "mode": mode, "fastest": min(ms, key=ms.get),
                "ms_over_pallas": {i: round(t / ms["pallas"], 3) for i, t in ms.items() if i != "pallas"}})


if __name__ == "__main__":
  main()
