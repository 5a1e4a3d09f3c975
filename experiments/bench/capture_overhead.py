"""Does capture (archs/hooks.py taps, interp.capture) cost training anything? Train-step cost per family.

For one small config of every family: the jit train step (train.step) is lowered and compiled; prints one
JSON line per family with XLA's cost_analysis FLOPs, a hash of the lowered StableHLO text and the median
step time over --repeats runs. Run it in this tree and in a tree without the taps (e.g. `git archive
<commit> | tar -x -C /tmp/base`, then `cd /tmp/base && python /path/to/this/script`) and compare: equal
FLOPs and equal HLO hashes mean the compiled step is the same program; step times are only indicative on a
shared machine.

  python experiments/bench/capture_overhead.py [--repeats 20] [--families lm,blt]
"""

import argparse
import hashlib
import json
import time


import jax
import numpy as np

from altbench import archs
from altbench.train import step as train_step
from altbench.train.config import TrainConfig

T = dict(d_model=64, n_heads=2, vocab_size=262, d_state=16, ssm_headdim=32, chunk_size=16)
BYTES = dict(vocab_size=262, d_model=64, n_heads=2, d_local=32, local_heads=2, d_state=16, ssm_headdim=32,
             chunk_size=16)
IDS = dict(mask_id=258, bot_id=259, eot_id=260)
CONFIGS = {
    "lm": dict(pattern="AMP", **T),
    "diffusion": dict(pattern="AM", mask_id=258, eos_id=256, **T),
    "coconut": dict(pattern="AM", thoughts=2, **IDS, **T),
    "recurrent": dict(pattern="AMA", prelude=1, coda=1, **T),
    "megabyte": dict(pattern="M", local_pattern="A", patch_size=4, **BYTES),
    "blt": dict(pattern="A", encoder_pattern="A", decoder_pattern="M", patcher="space", hash_buckets=16, **BYTES),
}


def batch(b, l, rng):
  x = rng.integers(97, 123, (1, b, l + 1)).astype(np.int32)
  x[..., 3:5] = 258  # <mask> placeholders: coconut's thoughts (other families just read them as tokens)
  ones = np.ones((1, b, l), np.int32)
  return {"inputs": x[..., :-1], "targets": x[..., 1:], "segment_ids": ones, "loss_mask": ones, "nbytes": ones}


def measure(name, repeats, b=4, l=64):
  family = archs.get_family(name)
  cfg = family.Config(**CONFIGS[name])
  tcfg = TrainConfig(steps=10, warmup_steps=1)
  tx = train_step.make_optimizer(tcfg)
  graphdef, state = train_step.init_state(family, cfg, tx, 0)
  fn = jax.jit(train_step.make_train_step(family, graphdef, tx, tcfg))
  data = batch(b, l, np.random.default_rng(0))
  lowered = fn.lower(state, data, jax.random.key(0))
  compiled = lowered.compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  times = []
  for i in range(repeats + 1):
    t = time.perf_counter()
    state, out = compiled(state, data, jax.random.key(i))
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  sha = hashlib.sha256(lowered.as_text().encode()).hexdigest()[:16]
  return {"family": name, "flops": float(cost["flops"]), "hlo_sha": sha,
          "step_ms": round(1000 * float(np.median(times[1:])), 3), "loss": float(out["loss"])}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--families", default=",".join(CONFIGS))
  args = ap.parse_args()
  for name in args.families.split(","):
    print(json.dumps(measure(name, args.repeats)), flush=True)


if __name__ == "__main__":
  main()
