"""What a user gets from `pip install`: every module imports as altbench.*, foreign packages named like our
folders change nothing, and every registered family trains (the last is what CI's newest-versions leg runs,
`-m install`, in a venv with no version constraints)."""

import importlib
import math
import os
import pkgutil
import subprocess
import sys

import pytest

import altbench
from altbench import archs
from altbench.train import arena, config, loop, metrics
from conftest import ROOT, SHAKESPEARE

PACKAGES = ("archs", "kernels", "train", "interp")


def test_every_module_imports_under_the_altbench_namespace():
  names = []
  for package in PACKAGES:
    module = importlib.import_module(f"altbench.{package}")
    names += [m.name for m in pkgutil.walk_packages(module.__path__, prefix=f"altbench.{package}.")]
  assert len(names) > 40, names
  for name in names:
    importlib.import_module(name)
  ours = lambda m: os.path.abspath(getattr(m, "__file__", None) or "/").startswith(ROOT + os.sep)
  bare = [name for name, m in list(sys.modules.items()) if name.split(".")[0] in PACKAGES and ours(m)]
  assert not bare, f"imported under a bare top-level name: {bare}"
  assert altbench.__version__


def _poison(folder):
  """Packages named like ours, each raising ImportError on import (as a foreign `kernels` or a user's `train`
  would break a bare import)."""
  for name in PACKAGES:
    os.makedirs(folder / name)
    (folder / name / "__init__.py").write_text(f"raise ImportError('the foreign {name} package was imported')\n")


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="needs ../shared/data/tinyshakespeare.txt")
def test_training_ignores_foreign_packages_named_like_ours(tmp_path):
  _poison(tmp_path)
  env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  sets = ["model.d_model=32", "model.n_heads=2", "data.seq_len=16", "data.eval_bytes=512",
          f"data.dataset=text:{SHAKESPEARE}", "train.batch_size=4", "train.samples=0", "train.steps=2",
          "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0"]
  cmd = [sys.executable, "-m", "altbench.cli", "train", os.path.join(ROOT, "experiments", "transformer.py:smoke"),
         "--workdir", str(tmp_path / "run")] + [a for s in sets for a in ("--set", s)]
  # cwd = the poisoned folder: `python -m` puts it first on sys.path, before the installed altbench
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert [m["step"] for m in metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if "loss" in m] == [1, 2]
  # and the poison works: a bare import from there fails
  bare = subprocess.run([sys.executable, "-c", "import kernels"], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert "the foreign kernels package was imported" in bare.stderr


@pytest.mark.install
def test_every_registered_family_trains_a_few_steps(tmp_path):
  """One smoke-arena entry per family, two steps each at its own small shape."""
  spec = arena.load(os.path.join(ROOT, "experiments", "arena.py") + ":smoke")
  cfgs = {}
  for entry in spec.entries:
    cfgs.setdefault(entry.family, entry.build(str(tmp_path)))
  assert set(cfgs) == set(archs.FAMILIES)
  for family, cfg in sorted(cfgs.items()):
    cfg = config.apply_overrides(cfg, ["train.steps=2", "train.log_every=1", "train.eval_every=0",
                                       "train.ckpt_every=0", "train.samples=0", "train.batch_size=4"])
    loop.train(cfg, str(tmp_path / family), log=lambda *a: None)
    losses = [m["loss"] for m in metrics.read_jsonl(str(tmp_path / family / "metrics.jsonl")) if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (family, losses)
