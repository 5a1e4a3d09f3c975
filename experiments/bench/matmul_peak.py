"""The matmul ceiling of this machine: one n x n x n matmul in f32 and bf16 through XLA, numpy and torch.

Throughput benchmarks of whole models are bounded by it: a training step cannot run its matmul FLOPs faster
than this. Prints one JSON line {"gflops": {"xla_f32", "xla_bf16", "numpy_f32", "torch_f32", "torch_bf16"}},
each the best of --reps timed runs after one warm-up (2 n^3 FLOPs per matmul); torch is skipped if absent.

  python experiments/bench/matmul_peak.py [--n 2048 --reps 10]
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def gflops(fn, n, reps):
  fn()
  best = min(_timed(fn) for _ in range(reps))
  return round(2 * n**3 / best / 1e9, 1)


def _timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=2048)
  parser.add_argument("--reps", type=int, default=10)
  args = parser.parse_args(argv)
  n = args.n
  a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
  matmul = jax.jit(lambda x: x @ x)
  out = {}
  for name, x in (("xla_f32", jnp.asarray(a)), ("xla_bf16", jnp.asarray(a, jnp.bfloat16))):
    out[name] = gflops(lambda x=x: matmul(x).block_until_ready(), n, args.reps)
  out["numpy_f32"] = gflops(lambda: a @ a, n, args.reps)
  try:
    import torch
    torch.set_num_threads(os.cpu_count())
    t = torch.from_numpy(a)
    out["torch_f32"] = gflops(lambda: t @ t, n, args.reps)
    tb = t.bfloat16()
    out["torch_bf16"] = gflops(lambda: tb @ tb, n, args.reps)
  except ImportError:
    pass
  line = {"bench": "matmul_peak", "n": n, "device": jax.devices()[0].device_kind, "threads": os.cpu_count(),
          "gflops": out}
  print(json.dumps(line), flush=True)
  return line


if __name__ == "__main__":
  main()
