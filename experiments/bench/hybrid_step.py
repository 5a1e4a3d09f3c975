"""End-to-end training step of a ~125M-parameter Mamba-2 hybrid at L=4K: Pallas kernels vs the XLA paths, and MFU.

Model (default): family lm, d_model 768, 12 blocks "MMMMMAMMMMMA" (2 attention, 10 Mamba-2, a SwiGLU MLP after
every mixer, as in Jamba), 12 heads of 64, d_state 128, ssm headdim 64, expand 2, chunk 128, vocab 32000
(tied: 124M parameters), bf16 compute with f32 parameters, AdamW; batch 1 x 4096 tokens (--batch / --length).
One step = forward + backward + clip + AdamW update, as the loop runs it.

Both variants are compiled first, then timed alternately (--repeats rounds of --steps steps); the median
round is reported. Lines: {"impl": "pallas" | "xla", "step_ms", "tokens_per_s", "tflops", "mfu"} and a
last line with "speedup" = xla step / pallas step. --impls ssm_pallas / attn_pallas put one kernel alone on Pallas.

--model gpt2: the arena gpu variant's GPT-2-small-shaped byte transformer instead (d 768 x 12 "A" blocks, 12
heads, bf16), for MFU at a realistic batch (issue 26: batch 4-8 x L 2048-4096).

FLOPs = the family's analytic training FLOPs (archs.lm.flops_per_token: 3 x forward matmul FLOPs, attention
over all L keys), the same number the training ledger logs; `tflops_causal` / `mfu_causal` count causal
attention's half of the score and value products instead (the convention of most MFU reports, e.g. MaxText's);
MFU = FLOPs per second / the device's dense bf16 peak (PEAK_TFLOPS below, by device kind; pass --peak-tflops for others). On a CPU backend only "xla" runs
(Pallas interpret mode is not a speed) and --smoke shrinks the model so the script can be checked quickly.

  python experiments/bench/hybrid_step.py [--batch 1 --length 4096 --steps 3 --repeats 3] [--smoke]
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time


import jax
import jax.numpy as jnp
import numpy as np

from altbench.archs import lm
from altbench.train import step as train_step
from altbench.train.config import TrainConfig

# Dense bf16 peak TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v5 lite": 197.0, "TPU v4": 275.0,
               "TPU v5p": 459.0, "TPU v6 lite": 918.0}

MODEL = lm.Config(pattern="MMMMMAMMMMMA", d_model=768, n_heads=12, d_state=128, ssm_headdim=64, chunk_size=128,
                  vocab_size=32000, tie_embeddings=True, dtype="bfloat16")
GPT2 = lm.Config(pattern="A" * 12, d_model=768, n_heads=12, vocab_size=262, dtype="bfloat16")
SMOKE = dataclasses.replace(MODEL, pattern="MA", d_model=64, n_heads=2, d_state=16, ssm_headdim=16, chunk_size=32,
                            vocab_size=256)


# --impls names: (attn_impl, ssm_impl)
VARIANTS = {"pallas": ("pallas", "pallas"), "xla": ("xla", "xla"), "ssm_pallas": ("xla", "pallas"),
            "attn_pallas": ("pallas", "xla")}


def peak_tflops(kind):
  return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def runner(cfg, batch, length, seed=0):
  tcfg = TrainConfig(steps=10**9, warmup_steps=0, lr=3e-4)
  x = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, batch, length + 1)), jnp.int32)
  data = {"inputs": x[..., :-1], "targets": x[..., 1:], "segment_ids": jnp.ones_like(x[..., 1:]),
          "loss_mask": jnp.ones_like(x[..., 1:]), "nbytes": jnp.ones_like(x[..., 1:])}
  return train_step.fixed_batch_runner(lm, cfg, tcfg, data, seed)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--peak-tflops", type=float, default=0.0)
  parser.add_argument("--impls", default="pallas,xla", help=f"comma list of {', '.join(VARIANTS)}")
  parser.add_argument("--model", choices=("hybrid", "gpt2"), default="hybrid")
  parser.add_argument("--smoke", action="store_true", help="a tiny model (to check the script on a CPU)")
  args = parser.parse_args(argv)
  base = SMOKE if args.smoke else {"hybrid": MODEL, "gpt2": GPT2}[args.model]
  kind, backend = jax.devices()[0].device_kind, jax.default_backend()
  impls = args.impls.split(",") if backend in ("gpu", "tpu") else ["xla"]
  bad = [i for i in impls if i not in VARIANTS]
  if bad:
    parser.error(f"--impls: unknown {bad}; valid: {', '.join(VARIANTS)}")
  runners = {i: runner(dataclasses.replace(base, attn_impl=VARIANTS[i][0], ssm_impl=VARIANTS[i][1]), args.batch,
                       args.length) for i in impls}
  first = {}
  for i, (run, _) in runners.items():  # compile and warm up
    t0 = time.perf_counter()
    first[i] = run(1)
    print(f"hybrid_step: {i} compiled and ran one step in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
          flush=True)
  times = {i: [] for i in impls}
  for r in range(args.repeats):
    for i in (impls if r % 2 == 0 else impls[::-1]):
      t0 = time.perf_counter()
      runners[i][0](args.steps)
      times[i].append((time.perf_counter() - t0) / args.steps)
  flops_step = lm.flops_per_token(base, args.length) * args.batch * args.length
  # causal attention computes half of the (L x L) score and value products: 3 (fwd + bwd) x 4 L h hd per token
  attn_half = 3 * 2 * args.length * base.n_heads * base.dim_head * sum(k in "AP" for k in base.pattern)
  flops_causal = flops_step - attn_half * args.batch * args.length
  peak = args.peak_tflops or peak_tflops(kind)
  lines = []
  for i in impls:
    step_s = statistics.median(times[i])
    tflops = flops_step / step_s / 1e12
    tflops_causal = flops_causal / step_s / 1e12
    lines.append({"bench": "hybrid_step", "impl": i, "attn_impl": VARIANTS[i][0], "ssm_impl": VARIANTS[i][1],
                  "model": "smoke" if args.smoke else args.model, "tflops_causal": round(tflops_causal, 3),
                  "mfu_causal": None if not peak else round(tflops_causal / peak, 4),
                  "device_kind": kind, "params": int(runners[i][1]),
                  "pattern": base.pattern, "batch": args.batch, "length": args.length, "step_ms": round(step_s * 1e3, 2),
                  "tokens_per_s": round(args.batch * args.length / step_s, 1), "tflops": round(tflops, 3),
                  "mfu": None if not peak else round(tflops / peak, 4), "peak_tflops": peak,
                  "loss_first": round(first[i], 4), "jax": jax.__version__})
  if "pallas" in impls and "xla" in impls:
    ms = {line["impl"]: line["step_ms"] for line in lines}
    lines.append({"bench": "hybrid_step", "speedup": round(ms["xla"] / ms["pallas"], 3),
                  "loss_first_diff": round(abs(first["pallas"] - first["xla"]), 4)})
  for line in lines:
    print(json.dumps(line), flush=True)
  return lines


if __name__ == "__main__":
  main()
