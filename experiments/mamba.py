"""Mamba-2 and hybrids against the transformer at equal parameter counts, on the pystdlib corpus.

Variants (all ~ the transformer baseline's parameters; "smoke" suffix: a few CPU minutes):
  transformer  "AAAA"
  mamba2       pure Mamba-2 ("MMMMMMM"), no MLPs, as many layers as match the parameters
  nemotron     interleaved hybrid "MMAMMMAM" (Nemotron-H-like: mostly Mamba-2, one attention layer in four)
  jamba        one attention layer per eight ("MMMAMMMM"), Jamba's 1:7 ratio
  falcon       Falcon-H1-style parallel blocks "PPPP": attention and Mamba-2 side by side, MLP width matched
  gdn          pure Gated DeltaNet "GGGG" (each block with its MLP, as in flash-linear-attention's models), MLP
               width matched
  gdn-hybrid   Qwen3-Next's 3:1 "GGGA" (n layers, the last an attention block: "GA" at 2, "GGA" at 3), MLP
               width matched
Hybrids without MLPs match the parameters by their layer count, so they are deeper than the transformer.
"""

import dataclasses

from altbench import archs
from altbench.archs import lm
from altbench.train.config import Config, DataConfig, TrainConfig, check_variant

ARCHS = ("transformer", "mamba2", "nemotron", "jamba", "falcon", "gdn", "gdn-hybrid")


def model_config(arch, d_model=256, n_heads=4, n_layers=4, **ssm):
  """The named architecture with parameters matched to the n_layers transformer of width d_model."""
  base = lm.Config(pattern="A" * n_layers, d_model=d_model, n_heads=n_heads, vocab_size=262, **ssm)
  target = archs.param_count("lm", base)
  if arch == "transformer":
    return dataclasses.replace(base, vocab_size=0)
  with_mlp = {"falcon": "P" * n_layers, "gdn": "G" * n_layers, "gdn-hybrid": ("GGGA" * n_layers)[:n_layers - 1] + "A"}
  if arch in with_mlp:  # blocks that keep their MLPs: the MLP width takes up the difference
    cfg = archs.match_params("lm", dataclasses.replace(base, pattern=with_mlp[arch]), target)
  else:  # Mamba-2 blocks carry no MLP (as in mamba_ssm and Nemotron-H): the layer count matches the parameters
    unit = {"mamba2": "M", "nemotron": "MMAM", "jamba": "MMMAMMMM"}[arch]
    count = _count_by_pattern(dataclasses.replace(base, mlp=False))
    options = [dataclasses.replace(base, pattern=(unit * 32)[:n], mlp=False) for n in range(1, 8 * n_layers)]
    cfg = min(options, key=lambda c: abs(count(c.pattern) - target))
  return dataclasses.replace(cfg, vocab_size=0)


def _count_by_pattern(cfg):
  """pattern -> parameter count of cfg with that pattern. Blocks are independent, so the count is the shared
  part (embeddings, head, final norm) plus one count per block letter: three small models measure them all
  (instead of one model per candidate pattern: minutes at 768 wide)."""
  one = {u: archs.param_count("lm", dataclasses.replace(cfg, pattern=u)) for u in "MA"}
  both = archs.param_count("lm", dataclasses.replace(cfg, pattern="MA"))
  shared, per_block = one["M"] + one["A"] - both, {"M": both - one["A"], "A": both - one["M"]}
  return lambda pattern: shared + sum(per_block[u] for u in pattern)


VARIANTS = ("", "smoke") + ARCHS + tuple(f"{a}-smoke" for a in ARCHS)


def get_config(variant=""):
  """The empty variant and "smoke" train the pure Mamba-2 model."""
  check_variant(variant, VARIANTS)
  arch = variant.removesuffix("-smoke").removesuffix("smoke") or "mamba2"
  if variant.endswith("smoke"):
    model = model_config(arch, d_model=128, n_heads=4, n_layers=2, d_state=32, ssm_headdim=32, chunk_size=32)
    data = DataConfig(seq_len=128, eval_bytes=32768)
    train = TrainConfig(steps=300, batch_size=16, lr=2e-3, warmup_steps=30, eval_every=100, ckpt_every=100,
                        sample_len=120)
  else:
    model = model_config(arch)
    data = DataConfig(seq_len=256)
    train = TrainConfig(steps=3000, batch_size=16, lr=2e-3, warmup_steps=200, eval_every=500, ckpt_every=500)
  return Config(family="lm", model=model, data=data, train=train)
