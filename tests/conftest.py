"""Shared test helpers: tiny configs that train in seconds on a CPU."""

import dataclasses
import os

# Before anything imports jax. The tests are compile-bound: at their tiny sizes LLVM's backend optimisations
# cost more compile time than they save at run time (the suite on 2 cores: 8 min 54 s -> 6 min 57 s, and it
# passes either way). Subprocesses the tests start inherit the flag.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest  # noqa: E402

from altbench.archs import lm  # noqa: E402
from altbench.train.config import Config, DataConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")


def tiny_config(**train):
  """A 2-block transformer on tinyshakespeare (or pystdlib when the shared data is absent)."""
  dataset = f"text:{SHAKESPEARE}" if os.path.exists(SHAKESPEARE) else "pystdlib"
  base = dict(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, eval_every=0, ckpt_every=3, samples=0)
  base.update(train)
  return Config(family="lm", model=lm.Config(pattern="AA", d_model=32, n_heads=2),
                data=DataConfig(dataset=dataset, seq_len=16, eval_bytes=512), train=TrainConfig(**base))


@pytest.fixture
def tiny():
  return tiny_config


def replace(cfg, **sections):
  """replace(cfg, train={"steps": 3}) -> cfg with those fields of those sections changed."""
  return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})
