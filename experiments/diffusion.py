"""Text diffusion against the AR transformer at equal training FLOPs on pystdlib (bits per byte; diffusion's
is an upper bound from the NELBO).

Variants, each also with a "-smoke" suffix (a few CPU minutes) and a "-cpu" suffix (the smoke widths trained 16x
longer, about 25 CPU minutes a run on 2 cores, evaluated 8 times so the bound-to-bpb ratio can be read against
FLOPs):
  ar            the causal transformer baseline ("AAAA")
  mdlm          masked diffusion on the same transformer, bidirectional
  mdlm-hybrid   masked diffusion on a bidirectional Mamba-2 / attention hybrid ("MAMA")
  bd3-4, bd3-16 block diffusion with blocks of 4 and 16 tokens (twice the FLOPs per token: fewer steps)
"" is mdlm. Every variant gets the same FLOPs budget: steps = budget / (FLOPs per step).
"""

import dataclasses

from altbench import archs
from altbench.archs import diffusion, lm
from altbench.train.config import Config, DataConfig, TrainConfig, check_variant

ARCHS = ("ar", "mdlm", "mdlm-hybrid", "bd3-4", "bd3-16")
SCALES = ("", "cpu", "smoke")
VARIANTS = ("", "smoke") + tuple(f"{a}-{s}" if s else a for a in ARCHS for s in SCALES)


def get_config(variant=""):
  check_variant(variant, VARIANTS)
  scale = next((s for s in ("cpu", "smoke") if variant.endswith(s)), "")
  arch = variant.removesuffix(scale).removesuffix("-") or "mdlm"
  small = scale in ("cpu", "smoke")
  width = dict(d_model=128, n_heads=4, pattern="AAA") if small else dict(d_model=256, n_heads=4, pattern="AAAA")
  seq_len, batch = (128, 16) if small else (256, 16)
  baseline_steps = {"smoke": 600, "cpu": 9600, "": 4000}[scale]
  n_evals = 8 if scale == "cpu" else 3
  if arch == "ar":
    family, model = "lm", lm.Config(**width)
  else:
    family = "diffusion"
    block = {"bd3-4": 4, "bd3-16": 16}.get(arch, 0)
    model = diffusion.Config(**width, block_size=block)
    if arch == "mdlm-hybrid":
      model = dataclasses.replace(model, pattern="MAMA"[: len(width["pattern"]) + 1], d_state=32, ssm_headdim=32,
                                  chunk_size=32)
  # Equal training FLOPs: the AR baseline's budget divided by this model's FLOPs per step.
  per_step = lambda fam, cfg: archs.get_family(fam).flops_per_token(dataclasses.replace(cfg, vocab_size=262),
                                                                    seq_len) * seq_len * batch
  budget = per_step("lm", lm.Config(**width)) * baseline_steps
  steps = max(1, round(budget / per_step(family, model)))
  data = DataConfig(seq_len=seq_len, eval_bytes=32768 if small else 131072)
  train = TrainConfig(steps=steps, batch_size=batch, lr=2e-3, warmup_steps=min(200, steps // 10),
                      eval_every=max(steps // n_evals, 1), ckpt_every=max(steps // 3, 1),
                      sample_len=64 if small else 128,
                      eval_repeats=1 if arch == "ar" else 4)
  return Config(family=family, model=model, data=data, train=train)
