"""Metrics as JSON lines, bits per byte, and the compute and energy ledger.

Every line of metrics.jsonl has step, tokens, flops (cumulative analytic training FLOPs), wall_s and
energy_j; train lines add loss, lr, grad_norm; eval lines add eval_loss and eval_bpb. Energy is measured
where the hardware tells (NVML on NVIDIA GPUs, RAPL on CPUs exposing /sys/class/powercap) and estimated
from a stated device power otherwise; `energy_source` says which.

What a meter covers: NVML, the GPUs this process can see (CUDA_VISIBLE_DEVICES honoured); RAPL, the CPU
packages of its node (top-level package zones only: a subzone such as intel-rapl:0:0, the cores inside package
0, is part of its package's count, and "psys" covers the whole platform, packages included); an estimate, the
stated power of this process's devices (per device on GPU/TPU) or of the node (CPU). With several processes,
`combine_energy` sums the per-process readings, once per node for node-wide meters.
"""

import glob
import json
import math
import os
import re
import socket
import zlib

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


DEFAULT_POWER_W = {"cpu": 15.0 * (os.cpu_count() or 1), "gpu": 700.0, "tpu": 200.0}  # node (cpu), device (gpu, tpu)
_RAPL_PACKAGE = re.compile(r"intel-rapl:\d+$")


def nvml_handles(pynvml):
  """NVML handles of the GPUs this process sees: CUDA_VISIBLE_DEVICES's entries (indices or GPU- UUIDs) when it
  is set, else every GPU. (NVML numbers GPUs in PCI bus order, as CUDA does with CUDA_DEVICE_ORDER=PCI_BUS_ID.)"""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is None:
    return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
  handles = []
  for entry in (e.strip() for e in visible.split(",")):
    if not entry:
      continue
    if entry.isdigit():
      handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(entry)))
    elif entry.startswith("GPU-"):
      handles.append(pynvml.nvmlDeviceGetHandleByUUID(entry))
    else:  # a MIG instance, or anything else NVML cannot attribute energy to: no measurement
      raise ValueError(f"CUDA_VISIBLE_DEVICES entry {entry!r}: energy is read per whole GPU (index or GPU- UUID)")
  return handles


def combine_energy(joules, hosts, scope):
  """Total joules of a multi-process run from each process's reading: a sum over processes for meters of
  the process's own devices (scope "device"), one reading per node for node-wide meters (scope "node")."""
  if scope == "device":
    return float(sum(joules))
  return float(sum({h: j for h, j in zip(hosts, joules)}.values()))


class EnergyMeter:
  """Cumulative joules since start(): NVML or RAPL counters when readable, else power_w * elapsed seconds."""

  def __init__(self, power_w=0.0, rapl_root="/sys/class/powercap"):
    backend = jax.default_backend()
    self.rapl_root = rapl_root
    # power_w is per device on accelerators, per node on CPU
    self.scope = "node" if backend == "cpu" else "device"
    per = power_w or DEFAULT_POWER_W.get(backend, 100.0)
    devices = 1 if backend == "cpu" else jax.local_device_count()
    self.power_w = per * devices
    where = f"{devices} {backend} devices" if devices > 1 else backend
    self._read, self.source = None, f"estimated ({self.power_w:g} W stated for {where})"
    if backend == "gpu":
      self._try_nvml()
    elif backend == "cpu":
      self._try_rapl()

  def _try_nvml(self):
    try:
      import pynvml
      pynvml.nvmlInit()
      handles = nvml_handles(pynvml)
      read = lambda: sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles) / 1e3
      read()
      self._read, self.source = read, "measured (NVML)"
    except Exception:
      pass

  def _try_rapl(self):
    zones = []
    for z in sorted(glob.glob(os.path.join(self.rapl_root, "intel-rapl:*/energy_uj"))):
      if not _RAPL_PACKAGE.fullmatch(os.path.basename(os.path.dirname(z))):
        continue  # a subzone (core, uncore, dram) of a package: already in the package's count
      try:
        with open(os.path.join(os.path.dirname(z), "name")) as f:
          if f.read().strip() == "psys":
            continue  # the whole platform, packages included
      except OSError:
        pass
      zones.append(z)
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
    self.scope = "node"

  def start(self, wall_s_now):
    self._t0, self._e0 = wall_s_now, self._read() if self._read else 0.0

  def joules(self, wall_s_now):
    """Energy since start(), of this process's meter."""
    if self._read:
      return self._read() - self._e0
    return self.power_w * (wall_s_now - self._t0)

  def total_joules(self, wall_s_now):
    """Energy since start() of the whole run: every process calls it at the same step (it gathers)."""
    joules = self.joules(wall_s_now)
    if jax.process_count() == 1:
      return joules
    from jax.experimental import multihost_utils
    import numpy as np
    host = zlib.crc32(socket.gethostname().encode())  # a node's id, exact in float64
    gathered = np.asarray(multihost_utils.process_allgather(np.array([joules, host], np.float64)))
    return combine_energy(gathered[:, 0], gathered[:, 1], self.scope)
