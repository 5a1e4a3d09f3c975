"""Multi-query associative recall (Zoology's MQAR): transformer, pure Mamba-2, Gated DeltaNet and hybrids at
equal parameters.

Attention recalls exactly; a fixed-size SSM state must compress the pairs, so accuracy falls with the
number of pairs for Mamba-2 and a few attention layers bring it back (the hybrids' selling point).
Variants: transformer | mamba2 | nemotron | jamba | falcon | gdn | gdn-hybrid, each with a "-smoke" suffix for CPU minutes;
"" is the jamba hybrid. Read `eval_acc` in metrics.jsonl.
"""

import dataclasses
import os

from altbench.train.config import Config, DataConfig, TrainConfig, check_variant, load_module

mamba = load_module(os.path.join(os.path.dirname(__file__), "mamba.py"))

VARIANTS = ("", "smoke") + mamba.ARCHS + tuple(f"{a}-smoke" for a in mamba.ARCHS)


def get_config(variant=""):
  check_variant(variant, VARIANTS)
  arch = variant.removesuffix("-smoke").removesuffix("smoke") or "jamba"
  smoke = variant.endswith("smoke")
  model = mamba.model_config(arch, d_model=64 if smoke else 128, n_heads=2 if smoke else 4, n_layers=2,
                             d_state=16 if smoke else 32, ssm_headdim=16 if smoke else 32, chunk_size=32)
  data = DataConfig(dataset="mqar", task_pairs=8 if smoke else 32, seq_len=64 if smoke else 256, eval_examples=512)
  train = TrainConfig(steps=400 if smoke else 4000, batch_size=32, lr=3e-3, warmup_steps=50, weight_decay=0.1,
                      eval_every=100 if smoke else 500, ckpt_every=200 if smoke else 1000, samples=0)
  return Config(family="lm", model=dataclasses.replace(model), data=data, train=train)
