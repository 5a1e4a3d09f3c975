"""The training loop unchanged on 1 device, 8 simulated CPU devices (data parallel, FSDP) and 2 processes.

Every run is the real CLI in a subprocess (device flags must be set before JAX starts), on the same tiny
model, data and global batch; their metrics.jsonl must agree step by step. Tolerance: rtol 1e-4 on the
training loss and gradient norm of every step and on the final held-out loss (f32; sharded runs only
reduce in another order, observed differences are ~1e-7 relative). The gradient norm is compared as well
because AdamW with clipping hides a wrong gradient scale (e.g. a sum over devices instead of a mean) from
the loss curve.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4
STEPS = 4
TIMEOUT_S = 240  # per group of subprocesses; they are killed when it runs out or one of them fails


def _tiny(corpus):
  sets = {"train.steps": STEPS, "train.log_every": 1, "train.samples": 0, "train.warmup_steps": 1,
          "train.batch_size": 8, "train.ckpt_every": 2, "train.eval_every": 0, "model.d_model": 64,
          "data.seq_len": 32, "data.eval_bytes": 2048, "data.dataset": f"text:{corpus}"}
  return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags)
  env.pop("ALTBENCH_DISTRIBUTED", None)
  return env


def _launch(workdir, corpus, *extra, log=None):
  cmd = [sys.executable, "-m", "altbench.cli", "train", "experiments/transformer.py:smoke", "--workdir", str(workdir),
         *_tiny(corpus), *extra]
  log = log or f"{workdir}.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
  proc.log, proc.cmd = log, cmd
  return proc


def _wait(procs, timeout=TIMEOUT_S, expect=0):
  """Wait for all; on a timeout or another exit status kill the others (they would wait on a dead peer)."""
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.returncode not in (None, expect)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # its own session (start_new_session): only what it started
        p.wait()
  bad = [p for p in procs if p.returncode != expect]
  if bad:
    tails = "\n".join(f"$ {' '.join(p.cmd)}\n-> exit {p.returncode}, expected {expect} (-9: killed after a peer "
                      f"failed or {timeout} s)\n{_tail(p.log)}" for p in bad)
    pytest.fail(f"training subprocess failed:\n{tails}")


def _tail(path, n=3000):
  text = open(path, errors="replace").read()
  return "\n".join(line for line in text[-n:].splitlines() if "it/s" not in line and "s/it" not in line)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  train = [l for l in lines if "loss" in l]
  final = [l for l in lines if l.get("final")]
  return train, final


def _assert_same_curve(run, ref):
  train, final = _metrics(run)
  ref_train, ref_final = _metrics(ref)
  assert [l["step"] for l in train] == list(range(1, STEPS + 1)), "one train line per step, written once"
  assert [l["step"] for l in ref_train] == list(range(1, STEPS + 1))
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([l[key] for l in train], [l[key] for l in ref_train], rtol=RTOL, atol=0,
                               err_msg=f"{key} per step of {run} vs the 1-device run")
  assert len(final) == 1 and len(ref_final) == 1
  np.testing.assert_allclose(final[0]["eval_loss"], ref_final[0]["eval_loss"], rtol=RTOL, atol=0)
  # The updates must change the loss far more than the tolerance, else the comparison proves nothing.
  assert abs(ref_train[-1]["loss"] - ref_train[0]["loss"]) > 100 * RTOL * ref_train[0]["loss"]


def _versions(workdir):
  saved = json.load(open(os.path.join(workdir, "config.json")))
  return saved["versions"], saved["config"]["mesh"]


def _param_shardings(workdir, step):
  """{name: (shape, partition spec, mesh shape)} of every array the run saved at `step` (orbax metadata)."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  meta = ocp.StandardCheckpointer().metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  out = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(dict(meta))[0]:
    sh = leaf.sharding
    out[jax.tree_util.keystr(keys)] = (tuple(leaf.shape), tuple(sh.partition_spec), tuple(int(x) for x in sh.shape))
  return out


def _assert_fsdp_sharded(workdir, step, fsdp, mesh_shape):
  """Every parameter and optimizer moment of >= 2 axes with an axis fsdp divides is split over "fsdp"."""
  arrays = _param_shardings(workdir, step)
  assert any(k.startswith("['params']") for k in arrays) and any(k.startswith("['opt']") for k in arrays)
  sharded = total = 0
  for name, (shape, spec, mesh) in arrays.items():
    assert mesh == mesh_shape, (name, mesh)
    can = len(shape) >= 2 and any(d % fsdp == 0 for d in shape)
    is_split = any(a == "fsdp" or (isinstance(a, (tuple, list)) and "fsdp" in a) for a in spec)
    assert is_split == can, f"{name} {shape}: partition spec {spec} (fsdp={fsdp})"
    if name.startswith("['params']"):
      total += int(np.prod(shape))
      sharded += int(np.prod(shape)) if is_split else 0
  assert sharded > 0.9 * total, f"only {sharded}/{total} parameter elements are sharded"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A ~120 KB deterministic text file: loads faster than the stdlib corpus."""
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":",
           "=", "+", "1", "0", "None", "True", "print", "list", "dict", "with", "as", "open", "data", "step", "loss"]
  lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(3000)]
  path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
  """The 1-device reference and the two 8-device runs, started together (compiling is mostly one core each)."""
  base = tmp_path_factory.mktemp("runs")
  dirs = {"ref": base / "ref", "dp8": base / "dp8", "fsdp8": base / "fsdp8"}
  procs = [_launch(dirs["ref"], corpus),
           _launch(dirs["dp8"], corpus, "--cpu-devices", "8", "--set", "mesh.data=8"),
           _launch(dirs["fsdp8"], corpus, "--cpu-devices", "8", "--set", "mesh.data=2", "--set", "mesh.fsdp=4")]
  _wait(procs)
  return dirs


def test_one_device_reference(runs):
  versions, mesh = _versions(runs["ref"])
  assert versions["devices"] == 1 and versions["processes"] == 1
  arrays = _param_shardings(runs["ref"], STEPS)
  assert all(spec == () for _, spec, _ in arrays.values())


def test_eight_devices_data_parallel_match_one_device(runs):
  versions, mesh = _versions(runs["dp8"])
  assert versions["devices"] == 8 and mesh == {"data": 8, "fsdp": 1}
  _assert_same_curve(runs["dp8"], runs["ref"])
  arrays = _param_shardings(runs["dp8"], STEPS)
  assert all(spec == () and m == (8, 1) for _, spec, m in arrays.values()), "data parallel replicates the state"


def test_eight_devices_fsdp_match_one_device_and_shard_parameters(runs):
  versions, mesh = _versions(runs["fsdp8"])
  assert versions["devices"] == 8 and mesh == {"data": 2, "fsdp": 4}
  _assert_same_curve(runs["fsdp8"], runs["ref"])
  for step in (2, STEPS):  # the periodic and the final checkpoint hold the state as training carried it
    _assert_fsdp_sharded(runs["fsdp8"], step, fsdp=4, mesh_shape=(2, 4))


def _two_processes(workdir, corpus, port, *extra):
  return [_launch(workdir, corpus, "--cpu-devices", "2", "--set", "mesh.data=2", "--set", "mesh.fsdp=2",
                  "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i), *extra,
                  log=f"{workdir}.process{i}.log")
          for i in range(2)]


@pytest.fixture(scope="module")
def two_process_run(runs, corpus, tmp_path_factory):
  """2 processes x 2 CPU devices, mesh data=2 x fsdp=2 (parameters split across processes), one shared workdir."""
  workdir = tmp_path_factory.mktemp("multi") / "run"
  _wait(_two_processes(workdir, corpus, _free_port()))
  return workdir


def test_two_processes_match_one_device(runs, two_process_run):
  workdir = two_process_run
  versions, mesh = _versions(workdir)
  assert versions["processes"] == 2 and versions["devices"] == 4 and mesh == {"data": 2, "fsdp": 2}
  _assert_same_curve(workdir, runs["ref"])
  logs = [open(f"{workdir}.process{i}.log").read() for i in range(2)]
  assert "altbench: held-out" in logs[0] and "altbench: held-out" not in logs[1], "process 0 alone reports"
  for step in (2, STEPS):
    _assert_fsdp_sharded(workdir, step, fsdp=2, mesh_shape=(2, 2))
    files = os.listdir(os.path.join(workdir, "checkpoints", str(step), "default"))
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(files), f"both processes write their shards: {files}"


@pytest.mark.slow
def test_two_processes_resume_from_checkpoint(runs, two_process_run, corpus, tmp_path):
  """Both processes restore the step-2 checkpoint of a 2-process run and finish with the same curve."""
  workdir = tmp_path / "resumed"
  shutil.copytree(two_process_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  procs = _two_processes(workdir, corpus, _free_port())
  _wait(procs)
  assert "resuming" in open(procs[0].log).read()
  _assert_same_curve(workdir, runs["ref"])


@pytest.mark.slow
def test_two_processes_stop_together_on_sigterm_to_one(corpus, tmp_path):
  """A preemption notice (SIGTERM) to process 1 alone: both agree on a step, save it and exit 130, no hang."""
  workdir = tmp_path / "preempted"
  procs = _two_processes(workdir, corpus, _free_port(), "--set", "train.steps=100", "--set", "train.ckpt_every=0")
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + TIMEOUT_S
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _tail(procs[0].log)
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  _wait(procs, expect=130)  # the exit status of an interrupted, resumable run
  train, _ = _metrics(workdir)
  stopped = train[-1]["step"]
  assert stopped < 100 and os.listdir(workdir / "checkpoints") == [str(stopped)]
