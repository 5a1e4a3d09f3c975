"""The compute and energy ledger of a finished run: energy (measured or estimated, labelled), analytic FLOPs with
XLA's cost analysis of the compiled train step as a cross-check, wall time, tokens, bytes and peak memory.

The loop's EnergyMeter integrates energy counters (NVML total energy, RAPL) or a stated power; where a device
only reports instantaneous power, `PowerTrace` samples it and `integrate_power` turns the trace into joules.
"""

import json
import os
import threading
import time

import jax
import numpy as np

from altbench.train import metrics

J_PER_KWH = 3.6e6


def integrate_power(t_s, watts):
  """Joules of a power trace: samples (t_s[i], watts[i]) joined by straight lines (the trapezoid rule)."""
  t_s, watts = np.asarray(t_s, np.float64), np.asarray(watts, np.float64)
  if t_s.shape != watts.shape or t_s.ndim != 1:
    raise ValueError(f"power trace: t_s {t_s.shape} and watts {watts.shape} must be equal-length 1-d arrays")
  if np.any(np.diff(t_s) < 0):
    raise ValueError("power trace: timestamps t_s must not decrease")
  if len(t_s) < 2:
    return 0.0
  return float(np.sum(0.5 * (watts[1:] + watts[:-1]) * np.diff(t_s)))


def energy_label(source):
  """'measured' or 'estimated' from an EnergyMeter source string such as 'measured (NVML)'."""
  kind = source.split(" ", 1)[0] if source else ""
  if kind not in ("measured", "estimated"):
    raise ValueError(f"energy source {source!r}: expected 'measured (...)' or 'estimated (...)'")
  return kind


class PowerTrace:
  """Samples a power reading (watts) every `interval_s` in a thread: NVML's board power on NVIDIA GPUs, or a
  given read() function. `available` is False (and the trace empty) where nothing reports power."""

  def __init__(self, read=None, interval_s=0.5):
    self.read, self.interval_s, self.t_s, self.watts = read or _nvml_power(), interval_s, [], []
    self._stop, self._thread = threading.Event(), None

  @property
  def available(self):
    return self.read is not None

  def __enter__(self):
    if self.available:
      self._thread = threading.Thread(target=self._run, daemon=True)
      self._thread.start()
    return self

  def _run(self):
    t0 = time.perf_counter()
    while True:
      self.t_s.append(time.perf_counter() - t0)
      self.watts.append(self.read())
      if self._stop.wait(self.interval_s):
        break
    self.t_s.append(time.perf_counter() - t0)
    self.watts.append(self.read())

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread:
      self._thread.join()

  def joules(self):
    return integrate_power(self.t_s, self.watts)


def _nvml_power():
  if jax.default_backend() != "gpu":
    return None
  try:
    import pynvml
    pynvml.nvmlInit()
    handles = metrics.nvml_handles(pynvml)
    read = lambda: sum(pynvml.nvmlDeviceGetPowerUsage(h) for h in handles) / 1e3  # milliwatts
    read()
    return read
  except Exception:
    return None


def compiled_step_cost(cfg):
  """XLA's FLOPs and memory of the train step of cfg (a resolved Config), compiled as the loop compiles it."""
  from altbench import archs
  from altbench.train import loop, mesh, step
  family = archs.get_family(cfg.family)
  mesh_ = mesh.make_mesh(cfg.mesh)
  tx = step.make_optimizer(cfg.train)
  graphdef, abstract, shardings, _ = loop.abstract_state(family, cfg, tx, mesh_)
  micro = cfg.train.batch_size // cfg.train.grad_accum
  shape = (cfg.train.grad_accum, micro, cfg.data.seq_len)
  batch_sharding = mesh.batch_sharding(mesh_)
  batch = {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding)
           for k in ("inputs", "targets", "segment_ids", "loss_mask", "nbytes")}
  if getattr(cfg.model, "thought_loss", 0) > 0:  # coconut's readout loss reads one more field
    from altbench.train.reasoning_tasks import THOUGHT_TARGETS
    batch["thought_targets"] = jax.ShapeDtypeStruct((*shape, THOUGHT_TARGETS), np.int32, sharding=batch_sharding)
  fn = jax.jit(step.make_train_step(family, graphdef, tx, cfg.train), donate_argnums=0,
               out_shardings=(shardings, None))
  compiled = fn.lower(abstract, batch, jax.random.key(0)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  out = {"xla_flops_per_step": float(cost.get("flops", 0.0))}
  mem = compiled.memory_analysis()
  if mem is not None:  # arguments (state, batch) + outputs + temporaries, less the donated aliases
    out["step_memory_bytes"] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                                   - mem.alias_size_in_bytes)
  return out


def device_peak_bytes():
  """Peak bytes in use on device 0 where the runtime reports it (GPU, TPU); None on CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def run_ledger(workdir, cfg, xla=None):
  """The ledger of a finished run directory from its metrics.jsonl (and xla: compiled_step_cost's dict)."""
  lines = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  final = [line for line in lines if line.get("final")]
  if not final:
    raise FileNotFoundError(f"{workdir}/metrics.jsonl has no final line (the run did not finish)")
  last = final[-1]
  source = last["energy_source"]
  out = {"steps": last["step"], "tokens": last["tokens"], "flops": last["flops"], "wall_s": last["wall_s"],
         "energy_j": last["energy_j"], "energy_kwh": last["energy_j"] / J_PER_KWH, "energy_source": source,
         "energy": energy_label(source)}
  # Bytes the model was trained on: tokens times the data's bytes per token (1 for bytes and tasks).
  stats_path = os.path.join(workdir, "data", "stats.json")
  bpt = 1.0
  if os.path.exists(stats_path):
    bpt = json.load(open(stats_path)).get("train_bytes_per_token", 1.0)
  out["train_bytes"] = int(round(last["tokens"] * bpt))
  if xla:
    per_step = last["flops"] / max(last["step"], 1)
    out.update(xla)
    out["xla_vs_analytic"] = xla["xla_flops_per_step"] / per_step if per_step else None
  return out
