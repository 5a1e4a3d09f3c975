"""Device mesh over ("data", "fsdp") and the sharding rules for parameters, optimizer state and batches.

Rule: a parameter (or optimizer moment) with two or more axes is split over "fsdp" along its largest
axis that the fsdp size divides; everything else is replicated. Batches are split over both axes.
The same code runs on one device, on simulated CPU devices and on many hosts.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(mesh_cfg):
  n = jax.device_count()
  fsdp = mesh_cfg.fsdp
  data = n // fsdp if mesh_cfg.data == -1 else mesh_cfg.data
  if data * fsdp != n:
    raise ValueError(f"mesh.data={mesh_cfg.data} x mesh.fsdp={fsdp} must use all {n} devices"
                     f" (set mesh.data=-1 to take the rest)")
  # Auto axes: XLA propagates shardings from the inputs (explicit sharding-in-types would need annotations
  # inside every model).
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _leaf_spec(shape, fsdp):
  if len(shape) < 2 or fsdp == 1:
    return P()
  axes = sorted(range(len(shape)), key=lambda a: -shape[a])
  for a in axes:
    if shape[a] % fsdp == 0:
      spec = [None] * len(shape)
      spec[a] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(mesh, abstract_state):
  """NamedSharding for every leaf of a (possibly abstract) state pytree."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(x.shape, fsdp)), abstract_state)


def batch_sharding(mesh):
  """Batches have shape (grad_accum, micro_batch, length): the micro-batch axis is split over all devices."""
  return NamedSharding(mesh, P(None, ("data", "fsdp")))


def put_batch(batch, sharding):
  """Host numpy batch (the global batch, identical on every process) -> global jax arrays."""
  def put(x):
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return {k: put(np.asarray(v)) for k, v in batch.items()}


def process_rows(sharding, grad_accum, micro):
  """Rows of the global batch (grad_accum * micro, reshaped to (grad_accum, micro)) that this process's devices
  hold, the only ones put_batch reads; None when it holds them all (one process)."""
  mine = set()
  for index in sharding.addressable_devices_indices_map((grad_accum, micro, 1)).values():
    mine.update(range(*index[1].indices(micro)))
  if len(mine) == micro:
    return None
  return np.array([a * micro + m for a in range(grad_accum) for m in sorted(mine)])
