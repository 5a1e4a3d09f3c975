"""The loop: loss falls, exact resume after SIGKILL, corrupt-checkpoint fallback, NaN stop, accumulation."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from altbench.train import loop, metrics
from altbench.train.config import ConfigError

from conftest import ROOT, SHAKESPEARE, replace, tiny_config

quiet = lambda *a, **k: None


def _losses(workdir):
  return {l["step"]: l["loss"] for l in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in l}


def test_loss_falls_and_run_directory_is_complete(tmp_path):
  cfg = tiny_config(steps=40, eval_every=20, ckpt_every=20, samples=1, sample_len=8)
  result = loop.train(cfg, str(tmp_path), log=quiet)
  losses = _losses(tmp_path)
  assert np.mean([losses[s] for s in range(36, 41)]) < np.mean([losses[s] for s in range(1, 6)]) - 1.0
  lines = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  for line in lines:
    assert {"step", "tokens", "flops", "wall_s", "energy_j", "energy_source"} <= set(line)
  assert [l["step"] for l in lines if "eval_bpb" in l] == [20, 40]
  assert result["eval_bpb"] < 8.0
  saved = json.load(open(tmp_path / "config.json"))
  assert saved["config"]["model"]["vocab_size"] == 262 and saved["versions"]["jax"] == jax.__version__
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]
  assert os.listdir(tmp_path / "samples") == ["step_0000040.txt"]
  # Cumulative ledger: tokens and FLOPs grow linearly with the step.
  per_step = [l["flops"] / l["step"] for l in lines]
  assert max(per_step) == pytest.approx(min(per_step))


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
  a = loop.train(tiny_config(steps=3), str(tmp_path / "a"), log=quiet)
  b = loop.train(tiny_config(steps=3, grad_accum=2), str(tmp_path / "b"), log=quiet)
  la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
  for s in la:
    assert la[s] == pytest.approx(lb[s], rel=1e-5)
  assert a["eval_bpb"] == pytest.approx(b["eval_bpb"], rel=1e-4)


def _cli(workdir, *sets):
  args = [sys.executable, "-m", "altbench.cli", "train", "experiments/transformer.py:smoke", "--workdir", str(workdir),
          "--set", "model.d_model=32", "--set", "model.n_heads=2", "--set", "data.seq_len=16",
          "--set", "data.eval_bytes=512", "--set", f"data.dataset=text:{SHAKESPEARE}", "--set", "train.batch_size=4",
          "--set", "train.samples=0", "--set", "train.log_every=1", "--set", "train.eval_every=0"]
  for s in sets:
    args += ["--set", s]
  return args


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="needs ../shared/data/tinyshakespeare.txt")
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  sets = ("train.steps=30", "train.ckpt_every=5")
  subprocess.run(_cli(tmp_path / "full", *sets), cwd=ROOT, check=True, capture_output=True, timeout=300)
  kill_after = random.Random().randint(7, 24)
  proc = subprocess.Popen(_cli(tmp_path / "killed", *sets), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if max(_losses(tmp_path / "killed"), default=0) >= kill_after:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, f"run finished before the kill at step {kill_after}"
  subprocess.run(_cli(tmp_path / "killed", *sets), cwd=ROOT, check=True, capture_output=True, timeout=300)
  full, resumed = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
  assert sorted(resumed) == list(range(1, 31))
  assert resumed == full  # bitwise on CPU: same batches, same restored state, same compiled step


def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys):
  loop.train(tiny_config(steps=6, ckpt_every=3), str(tmp_path / "ref"), log=quiet)
  cfg = tiny_config(steps=6, ckpt_every=3)
  work = tmp_path / "run"
  loop.train(cfg, str(work), log=quiet)
  # Damage every file of the newest checkpoint (step 6) and rerun: it must resume from step 3 and redo
  # steps 4..6 exactly as the reference run did.
  for root, _, files in os.walk(work / "checkpoints" / "6"):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.truncate(max(os.path.getsize(path) // 3, 1))
  loop.train(cfg, str(work), log=quiet)
  assert "checkpoint step 6" in capsys.readouterr().err
  assert os.path.isdir(work / "checkpoints_corrupt" / "6")
  assert _losses(work) == _losses(tmp_path / "ref")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config(steps=12, ckpt_every=4, lr=1e12, grad_clip=0.0, warmup_steps=0)
  with pytest.raises(loop.NonFiniteLoss, match=r"step \d+: (loss|grad_norm) is (nan|inf)") as e:
    loop.train(cfg, str(tmp_path), log=quiet)
  bad_step = int(str(e.value).split()[1].rstrip(":"))
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert all(s < bad_step for s in steps)


def test_resume_with_other_config_is_refused(tmp_path):
  loop.train(tiny_config(steps=2), str(tmp_path), log=quiet)
  before = open(tmp_path / "metrics.jsonl").read()
  with pytest.raises(ConfigError, match="model.d_model"):
    loop.train(replace(tiny_config(steps=2), model={"d_model": 48}), str(tmp_path), log=quiet)
  assert open(tmp_path / "metrics.jsonl").read() == before


@pytest.mark.parametrize("train,needle", [({"samples": 1, "sample_len": 0}, "train.sample_len=0: must be >= 1"),
                                          ({"eval_every": -1}, "train.eval_every=-1: must be >= 0")])
def test_out_of_range_values_are_refused_before_anything_runs(tmp_path, train, needle):
  """sample_len=0 used to train to the end, then crash with an IndexError at sampling; eval_every=-1 evaluated
  at every step."""
  with pytest.raises(ConfigError, match=needle):
    loop.train(tiny_config(**train), str(tmp_path / "run"), log=quiet)
  assert not os.path.exists(tmp_path / "run")


def test_init_from_starts_at_another_runs_parameters(tmp_path):
  a = loop.train(tiny_config(steps=6), str(tmp_path / "a"), log=quiet)
  # With lr = 1e-12 nothing moves measurably, so a run started from a's parameters scores a's held-out bpb, and
  # one started from its own seed does not.
  frozen = dict(steps=1, lr=1e-12, warmup_steps=1)
  b = loop.train(tiny_config(**frozen, init_from=str(tmp_path / "a")), str(tmp_path / "b"), log=quiet)
  c = loop.train(tiny_config(**frozen), str(tmp_path / "c"), log=quiet)
  assert b["eval_bpb"] == pytest.approx(a["eval_bpb"], rel=1e-6) and abs(c["eval_bpb"] - a["eval_bpb"]) > 0.01
  with pytest.raises(ConfigError, match=r"train.init_from=.*do not fit this model"):
    loop.train(replace(tiny_config(steps=1, init_from=str(tmp_path / "a")), model={"d_model": 48}),
               str(tmp_path / "d"), log=quiet)
  with pytest.raises(ConfigError, match="not a run directory"):
    loop.train(tiny_config(steps=1, init_from=str(tmp_path / "nope")), str(tmp_path / "e"), log=quiet)
  assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "e")  # refused before writing


def test_fixed_batch_runner_trains_the_real_step():
  # The benchmarks' runner: n steps on one batch are the training step, so the loss on that batch falls
  # (it memorises it) and the parameter count is the family's.
  import dataclasses

  import jax.numpy as jnp

  from altbench import archs
  from altbench.archs import lm
  from altbench.train import step
  cfg = tiny_config()
  model = dataclasses.replace(cfg.model, vocab_size=64)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 4, 17)), jnp.int32)
  batch = {"inputs": x[..., :-1], "targets": x[..., 1:], "loss_mask": jnp.ones_like(x[..., 1:]),
           "nbytes": jnp.ones_like(x[..., 1:])}
  run, params = step.fixed_batch_runner(lm, model, dataclasses.replace(cfg.train, steps=10**6, warmup_steps=0), batch)
  first = run(1)
  assert abs(first - np.log(64)) < 0.3, first
  assert run(30) < first - 1.0
  assert params == archs.param_count("lm", model)
