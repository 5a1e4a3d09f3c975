"""The transformer baseline (pattern "AAAA") on the pystdlib corpus, byte tokenizer.

Variants: "" (a CPU-hour run), "smoke" (a few minutes on a laptop CPU), "small" (~GPU minutes).
"""

import dataclasses

from altbench.archs import lm
from altbench.train.config import Config, DataConfig, MeshConfig, TrainConfig, check_variant


def get_config(variant=""):
  check_variant(variant, ("", "smoke", "small"))
  model = lm.Config(pattern="AAAA", d_model=256, n_heads=4)
  data = DataConfig(dataset="pystdlib", tokenizer="bytes", seq_len=256)
  train = TrainConfig(steps=3000, batch_size=16, lr=2e-3, warmup_steps=200, eval_every=500, ckpt_every=500)
  if variant == "smoke":
    model = dataclasses.replace(model, d_model=128, pattern="AAA")
    data = dataclasses.replace(data, seq_len=128, eval_bytes=32768)
    train = dataclasses.replace(train, steps=300, batch_size=16, warmup_steps=30, eval_every=100, ckpt_every=100,
                                log_every=10, sample_len=120)
  if variant == "small":
    model = dataclasses.replace(model, d_model=512, n_heads=8, n_kv_heads=4, pattern="A" * 8)
    data = dataclasses.replace(data, seq_len=1024, eval_bytes=1 << 20)
    train = dataclasses.replace(train, steps=5000, batch_size=32, lr=1e-3)
  return Config(family="lm", model=model, data=data, train=train, mesh=MeshConfig())
