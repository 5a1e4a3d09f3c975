"""Kernel block sizes: time a bounded list of candidates per (op, shape class) on this device and, with
--tune, write the fastest into the tuning table the kernels read (kernels/tuning.py).

    altbench bench kernels [--tune] [--table PATH] [--quick] [--reps 5]

Ops by backend (each measured as jax.jit(jax.grad) of sum(op(...) * fixed cotangent), i.e. forward +
backward, through the public op so exactly what training runs is timed):
  gpu / tpu  flash_attention (kernels.attention impl="pallas", bf16, causal) and ssd_pallas (kernels.ssd
             impl="pallas", bf16; GPU tiles only: the TPU kernels take whole chunks);
  gpu        gated_delta_pallas (kernels.gated_delta impl="pallas", bf16, b2 x 4K, h16, dk = dv = 128):
             dv tile per program and Triton warps / stages;
  gpu        attention_gpu_impl: kernels.attention impl="auto" (bf16, causal, d 64 and 128) with the entry
             {"impl": "pallas"} (the flash kernels) and {"impl": "cudnn"} (cuDNN's fused attention): which
             of the two impl="auto" runs on this GPU; measured after flash_attention, with its blocks;
  cpu        attention_xla (the causal XLA path's query block) and ssd_xla (the CPU working-set size that
             sets how many chunks the XLA SSD runs per block).
Each candidate is traced with a copy of the table being tuned with that candidate's entry in place
(ALTBENCH_KERNEL_TABLE points at a temporary file; with --tune the ops tuned before it count), compiled, run once, then timed --reps times; the median is kept. The choice is the first
candidate in list order within --tolerance of the fastest median (deterministic under noise between
near-equal candidates); a candidate that fails to compile or run is reported and never chosen.

One JSON line per candidate {"op", "shape_class", "device_kind", "params", "ms"} (or "error"), then one
per (op, shape class) with "chosen" and "speedup_vs_default" (default params' median / chosen median).
Without --tune nothing is written. --table defaults to $ALTBENCH_KERNEL_TABLE or kernels/tuned_blocks.json.
"""

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import tempfile
import time


import jax
import jax.numpy as jnp
import numpy as np

from altbench import kernels
from altbench.kernels import flash_attention, gated_delta_pallas, ssd_pallas, tuning

attention = importlib.import_module("altbench.kernels.attention")  # the module; kernels.attention is the op

FB = flash_attention.BlockSizes
SB = ssd_pallas.BlockSizes
GB = gated_delta_pallas.BlockSizes


def _attention_case(b, length, h, d, dtype, impl):
  rng = np.random.default_rng(0)
  q, k, v, ct = (jnp.asarray(rng.standard_normal((b, length, h, d)), dtype) for _ in range(4))
  loss = lambda q, k, v: jnp.sum(kernels.attention(q, k, v, causal=True, impl=impl).astype(jnp.float32) * ct)
  return jax.grad(loss, argnums=(0, 1, 2)), (q, k, v)


def _ssd_case(b, length, h, p, n, chunk, dtype, impl):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, length, h, p)), dtype)
  dt = jnp.asarray(rng.standard_normal((b, length, h)) - 2.0, dtype)
  A = -jnp.asarray(rng.uniform(1, 16, h), jnp.float32)
  B, C = (jnp.asarray(rng.standard_normal((b, length, 1, n)), dtype) for _ in range(2))
  ct = jnp.asarray(rng.standard_normal((b, length, h, p)), jnp.float32)

  def loss(x, dt, B, C):
    y = kernels.ssd(x, dt, A, B, C, chunk, dt_softplus=True, impl=impl)
    return jnp.sum(y.astype(jnp.float32) * ct)

  return jax.grad(loss, argnums=(0, 1, 2, 3)), (x, dt, B, C)


def _gated_delta_case(b, length, h, dk, dv, chunk, dtype, impl):
  rng = np.random.default_rng(0)
  k = rng.standard_normal((b, length, h, dk))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  q, k = jnp.asarray(rng.standard_normal((b, length, h, dk)), dtype), jnp.asarray(k, dtype)
  v = jnp.asarray(rng.standard_normal((b, length, h, dv)), dtype)
  g = jnp.asarray(-np.logaddexp(0.0, rng.standard_normal((b, length, h))), jnp.float32)
  beta = jnp.asarray(1.0 / (1.0 + np.exp(-rng.standard_normal((b, length, h)))), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((b, length, h, dv)), jnp.float32)

  def loss(q, k, v, g, beta):
    o = kernels.gated_delta(q, k, v, g, beta, chunk_size=chunk, impl=impl)
    return jnp.sum(o.astype(jnp.float32) * ct)

  return jax.grad(loss, argnums=(0, 1, 2, 3, 4)), (q, k, v, g, beta)


def cases(backend, quick):
  """(op, shape class, make the grad fn and its args, candidates as param dicts; the first is the default)."""
  asdict = dataclasses.asdict
  if backend == "cpu":
    att = (2, 256, 4, 64) if quick else (8, 1024, 4, 64)
    ssd = (2, 512, 4, 32, 32, 64) if quick else (8, 2048, 8, 64, 64, 64)
    return [
        ("attention_xla", f"d{att[3]}", lambda: _attention_case(*att, jnp.float32, "xla"),
         [{"causal_block": c} for c in ((64, 128) if quick else (64, 32, 128, 256))]),
        ("ssd_xla", tuning.ssd_class(ssd[3], ssd[4]), lambda: _ssd_case(*ssd, jnp.float32, "xla"),
         [{"cpu_block_bytes": c << 10} for c in ((512, 128) if quick else (512, 128, 256, 1024, 2048, 8192))]),
    ]
  out = []
  for d in (64, 128):
    default = asdict(flash_attention._BLOCKS[(backend, d)])
    if backend == "gpu":
      grid = [FB(128, 64, 32, 128, 128, 32, 4, 3), FB(128, 128, 64, 128, 128, 64, 8, 2), FB(64, 64, 32, 64, 64, 32, 4, 2),
              FB(128, 32, 32, 64, 64, 32, 4, 3), FB(64, 128, 64, 64, 64, 64, 8, 3)]
    else:
      grid = [FB(1024, 512, 512, 1024, 1024, 512), FB(256, 256, 128, 256, 256, 128), FB(512, 1024, 256, 512, 512, 256)]
    cands = [default] + [c for c in map(asdict, grid) if c != default]
    if backend == "gpu":  # issue 26's kernel options (flash_attention.GPU_CANDIDATES) on the default blocks
      cands += [{**default, **o} for o in flash_attention.GPU_CANDIDATES[d].values()]
    out.append(("flash_attention", f"d{d}", lambda d=d: _attention_case(4, 4096, 2048 // d, d, jnp.bfloat16, "pallas"),
                cands[:3] if quick else cands))
  if backend == "gpu":
    default = asdict(SB())
    grid = [SB(64, 64, 32, 4, 4, 2), SB(32, 64, 32, 4, 4, 2), SB(64, 32, 64, 2, 4, 3), SB(128, 64, 64, 4, 8, 2),
            SB(32, 32, 32, 8, 4, 2)]
    cands = [default] + [c for c in map(asdict, grid) if c != default]
    out.append(("ssd_pallas", tuning.ssd_class(64, 128),
                lambda: _ssd_case(4, 4096, 32, 64, 128, 128, jnp.bfloat16, "pallas"), cands[:3] if quick else cands))
    default = asdict(GB())
    grid = [GB(32, 4, 1), GB(32, 8, 1), GB(128, 8, 1), GB(64, 4, 1), GB(64, 8, 2), GB(16, 4, 1)]
    cands = [default] + [c for c in map(asdict, grid) if c != default]
    out.append(("gated_delta_pallas", tuning.gated_delta_class(128, 128),
                lambda: _gated_delta_case(2, 4096, 16, 128, 128, 64, jnp.bfloat16, "pallas"),
                cands[:3] if quick else cands))
    for d in (64, 128):  # after flash_attention: with --tune its chosen blocks are in the table by then
      out.append((attention.GPU_IMPL_OP, f"d{d}",
                  lambda d=d: _attention_case(4, 4096, 2048 // d, d, jnp.bfloat16, "auto"),
                  [{"impl": "pallas"}, {"impl": "cudnn"}]))
  return out


def measure(op, shape_class, make, params, reps, kind, table=None):
  """Median ms of the grad fn traced with the entries of `table` (a dict) and this candidate's."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "table.json")
    tuning.write_entries({**(table or {}), tuning.key(op, kind, shape_class): params}, path)
    old = os.environ.get(tuning.TABLE_ENV)
    os.environ[tuning.TABLE_ENV] = path
    try:
      grad, args = make()
      fn = jax.jit(grad)  # a new function per candidate: the table is read when it is traced
      jax.block_until_ready(fn(*args))
      times = []
      for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
      return statistics.median(times)
    finally:
      if old is None:
        os.environ.pop(tuning.TABLE_ENV, None)
      else:
        os.environ[tuning.TABLE_ENV] = old


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tune", action="store_true", help="write the chosen entries into the table")
  parser.add_argument("--table", default=None, help="table to write (default: $ALTBENCH_KERNEL_TABLE or "
                      "kernels/tuned_blocks.json)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--tolerance", type=float, default=0.03)
  parser.add_argument("--quick", action="store_true", help="small shapes and at most 2-3 candidates per op")
  parser.add_argument("--ops", default="", help="comma-separated subset of ops")
  args = parser.parse_args(argv)
  if args.reps < 1:
    parser.error(f"--reps={args.reps}: must be >= 1")
  table = args.table or tuning.table_path()
  kind, backend = tuning.device_kind(), jax.default_backend()
  wanted = set(filter(None, args.ops.split(",")))
  chosen = {}
  for op, shape_class, make, candidates in cases(backend, args.quick):
    if wanted and op not in wanted:
      continue
    medians = []
    for params in candidates:
      line = {"bench": "kernels", "op": op, "shape_class": shape_class, "device_kind": kind, "params": params}
      try:
        ms = measure(op, shape_class, make, params, args.reps, kind, tuning.read_table(table))
        line["ms"] = round(ms, 3)
      except Exception as e:  # a candidate that does not fit this device is skipped, not fatal
        ms, line["error"] = None, f"{type(e).__name__}: {str(e)[:200]}"
      medians.append(ms)
      print(json.dumps(line), flush=True)
    i = tuning.choose(candidates, medians, args.tolerance)
    chosen[tuning.key(op, kind, shape_class)] = candidates[i]
    speedup = medians[0] / medians[i] if medians[0] else None
    print(json.dumps({"bench": "kernels", "op": op, "shape_class": shape_class, "device_kind": kind,
                      "chosen": candidates[i], "ms": round(medians[i], 3),
                      "speedup_vs_default": None if speedup is None else round(speedup, 3)}), flush=True)
    if args.tune:  # after every op, so a run cut short keeps what it finished
      tuning.write_entries({tuning.key(op, kind, shape_class): candidates[i]}, table)
      print(json.dumps({"bench": "kernels", "wrote": table, "entry": tuning.key(op, kind, shape_class)}), flush=True)
  return chosen


if __name__ == "__main__":
  main()
