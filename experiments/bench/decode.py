"""Decode cost per token against context length: pure Mamba-2 and pure Gated DeltaNet (constant state) vs the
transformer (KV cache).

For each model and context C, prefills C tokens, then times single-token decode steps (one jit call each,
median of repeats). Prints one JSON line per (model, context) and a summary line with the ratio
time(largest C) / time(smallest C) per model: about 1 for Mamba-2 and Gated DeltaNet (target <= 1.2), growing
for attention.
Run: python experiments/bench/decode.py [--contexts 1024 8192] [--steps 32]
"""

import argparse
import json
import platform

import jax

from altbench.archs import lm
from altbench.train.decode import time_decode


def models(d_model):
  common = dict(vocab_size=262, d_model=d_model, n_heads=4)
  return {"mamba2": lm.Config(pattern="M" * 7, mlp=False, **common), "gdn": lm.Config(pattern="GGGG", **common),
          "transformer": lm.Config(pattern="AAAA", **common)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
  parser.add_argument("--d-model", type=int, default=256)
  parser.add_argument("--steps", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  names = list(models(64))
  parser.add_argument("--models", nargs="+", default=names, choices=names)
  args = parser.parse_args()
  device = f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})"
  summary = {"bench": "decode", "summary": True, "device": device}
  for name, cfg in models(args.d_model).items():
    if name not in args.models:
      continue
    per_ctx = {c: 1e3 * t for c, t in time_decode(cfg, args.contexts, args.steps, args.repeats).items()}
    for context, ms in per_ctx.items():
      print(json.dumps({"bench": "decode", "model": name, "pattern": cfg.pattern, "context": context,
                        "ms_per_token": round(ms, 4), "device": device}), flush=True)
    summary[f"{name}_ratio_{max(args.contexts)}_vs_{min(args.contexts)}"] = round(
        per_ctx[max(args.contexts)] / per_ctx[min(args.contexts)], 3)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
