"""Metrics as JSON lines, bits per byte, and the compute and energy ledger.

Every line of metrics.jsonl has step, tokens, flops (cumulative analytic training FLOPs), wall_s and
energy_j; train lines add loss, lr, grad_norm; eval lines add eval_loss and eval_bpb. Energy is measured
where the hardware tells (NVML on NVIDIA GPUs, RAPL on CPUs exposing /sys/class/powercap) and estimated
from a stated device power otherwise; `energy_source` says which.
"""

import glob
import json
import math
import os

import jax


def bits_per_byte(nats, nbytes):
  """Total negative log-likelihood in nats over a text of nbytes bytes -> bits per byte."""
  return nats / math.log(2) / nbytes


def read_jsonl(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_json_atomic(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


class MetricsLog:
  """Appends JSON lines; on resume, drops lines past the restored step (they will be logged again)."""

  def __init__(self, path, resume_step):
    self.path = path
    lines = [line for line in read_jsonl(path) if line.get("step", 0) <= resume_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)
    os.replace(tmp, path)
    self.last = next((line for line in reversed(lines) if "wall_s" in line), {})
    self.file = open(path, "a")

  def write(self, record):
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()

  def close(self):
    self.file.close()


DEFAULT_POWER_W = {"cpu": 15.0 * (os.cpu_count() or 1), "gpu": 700.0, "tpu": 200.0}


class EnergyMeter:
  """Cumulative joules since start(): NVML or RAPL counters when readable, else power_w * elapsed seconds."""

  def __init__(self, power_w=0.0, rapl_root="/sys/class/powercap"):
    backend = jax.default_backend()
    self.rapl_root = rapl_root
    self.power_w = power_w or DEFAULT_POWER_W.get(backend, 100.0)
    self._read, self.source = None, f"estimated ({self.power_w:g} W stated for {backend})"
    if backend == "gpu":
      self._try_nvml()
    elif backend == "cpu":
      self._try_rapl()

  def _try_nvml(self):
    try:
      import pynvml
      pynvml.nvmlInit()
      handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
      read = lambda: sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles) / 1e3
      read()
      self._read, self.source = read, "measured (NVML)"
    except Exception:
      pass

  def _try_rapl(self):
    zones = sorted(glob.glob(os.path.join(self.rapl_root, "intel-rapl:[0-9]*/energy_uj")))
    try:
      ranges = [int(open(z.replace("energy_uj", "max_energy_range_uj")).read()) for z in zones]
      read_raw = lambda: [int(open(z).read()) for z in zones]
      read_raw()
    except OSError:
      return
    if not zones:
      return
    self._rapl_ranges, self._rapl_raw, self._rapl_total = ranges, read_raw(), 0.0

    def read():
      now = read_raw()
      for i, (a, b) in enumerate(zip(self._rapl_raw, now)):
        self._rapl_total += ((b - a) % self._rapl_ranges[i]) / 1e6  # counters wrap around
      self._rapl_raw = now
      return self._rapl_total

    self._read, self.source = read, "measured (RAPL)"

  def start(self, wall_s_now):
    self._t0, self._e0 = wall_s_now, self._read() if self._read else 0.0

  def joules(self, wall_s_now):
    """Energy since start()."""
    if self._read:
      return self._read() - self._e0
    return self.power_w * (wall_s_now - self._t0)
