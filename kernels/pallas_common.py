"""What the Pallas kernels share across ops (flash attention, SSD) and backends (Triton GPU, Mosaic TPU).

The backend -> target rule, Pallas API-name compatibility across jax versions, integer index math
that lowers simply on both backends, the one matmul every kernel uses, operands and refs by name, the
few tile functions that the GPU and TPU kernels of one op both apply (so that the two backends
cannot drift apart in their masking, decay or gating math), and ``shard_batch``, which runs a kernel
per device under a multi-device mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

TARGETS = ("gpu", "tpu")
LANES, SUBLANES = 128, 8  # the TPU (8, 128) tile layout
f32 = jnp.float32


def backend_target(backend=None):
  """"gpu" / "tpu" for a backend with Pallas kernels, else None (e.g. "cpu")."""
  backend = backend or jax.default_backend()
  return backend if backend in TARGETS else None


# --------------------------------------------------------------------------------------------
# API-name compatibility (jax 0.10 / 0.11 and a little older)


def triton_params(num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def tpu_params(semantics):
  from jax.experimental.pallas import tpu as pltpu
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=semantics)


def tpu_vmem(shape, dtype):
  from jax.experimental.pallas import tpu as pltpu
  space = getattr(pltpu, "VMEM", None) or pltpu.MemorySpace.VMEM  # pltpu.TPUMemorySpace on old jax
  return space(shape, dtype)


def tpu_interpret_params():
  """What to pass as interpret= to run the TPU kernels on CPU (simulated TPU memory if available)."""
  from jax.experimental.pallas import tpu as pltpu
  cls = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams", None)
  return cls() if cls is not None else True


def tpu_interpret(interpret):
  """A call's interpret flag as the TPU kernels take it: True becomes the simulated-TPU interpreter."""
  return tpu_interpret_params() if interpret is True else interpret


# --------------------------------------------------------------------------------------------
# Index arithmetic and loops


def idiv(a, b):
  # Truncating integer division of non-negative values; lax.div keeps both Triton and Mosaic
  # lowerings simple (jnp's floor division adds sign fix-ups), and a numpy scalar stays a literal
  # (pallas_call rejects captured constants).
  return lax.div(a, np.int32(b))


def cdiv(a, b):
  return idiv(a + (b - 1), b)


def fori(lo, hi, body, carry):
  # A loop with static bounds becomes a scan; skip statically empty ones rather than lowering a
  # zero-trip loop.
  if isinstance(lo, int) and isinstance(hi, int) and lo >= hi:
    return carry
  return lax.fori_loop(lo, hi, body, carry)


def round_up(x, m):
  return -(-x // m) * m


def pow2_at_least(x):
  return 1 << max(0, int(x) - 1).bit_length()


# --------------------------------------------------------------------------------------------
# Matmul and refs


_DIMS = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}


def dot(a, b, kind="nn"):
  """a @ b ("nn"), a @ b.T ("nt") or a.T @ b ("tn"), float32 accumulation; float32 operands are
  not rounded to TF32/bf16 (explicit either way, so a global default_matmul_precision cannot turn
  bf16 tiles into fp32 passes or fp32 tiles into TF32 ones)."""
  precision = lax.Precision.HIGHEST if a.dtype == f32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, (_DIMS[kind], ((), ())), precision=precision,
                         preferred_element_type=f32)


def named_operands(*operands):
  """(names, specs, values) of a pallas_call's operands from (name, BlockSpec, value) triples, in
  order, leaving out those whose value is None (an optional input not given, an output not wanted):
  the kernel finds what it got by name (refs_by_name)."""
  present = [op for op in operands if op[2] is not None]
  return [op[0] for op in present], [op[1] for op in present], [op[2] for op in present]


def refs_by_name(refs, names):
  """Kernel refs by name; names is the ordered list of present refs (optional operands vary it)."""
  assert len(refs) == len(names), (len(refs), names)
  return dict(zip(names, refs))


# --------------------------------------------------------------------------------------------
# Flash attention tiles (both backends). Scores are in base 2: scaled by scale * log2(e), exp2.

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # same as kernels.attention
PAD_VALUE = float(np.finfo(np.float32).min)          # below MASK_VALUE: pad keys never count
LOG2E = math.log2(math.e)


def seg_refs(refs, n_inputs, has_seg):
  """A kernel's refs with its segment-id refs (q ids, kv ids, right after its first n_inputs inputs)
  as None where the call has none, so that every kernel unpacks one list either way."""
  return tuple(refs) if has_seg else (*refs[:n_inputs], None, None, *refs[n_inputs:])


def mask_scores(s, row, col, q_ids, kv_ids, *, causal, kv_len=None):
  """Mask scores; returns (masked scores, visibility or None). row/col/ids broadcast to s.

  kv_len: mask columns >= kv_len (padding) with PAD_VALUE, which stays out of even a fully-masked
  row's uniform average. Visibility (causal, segments) is returned for zeroing ds.
  """
  visible = None
  if causal:
    visible = row >= col
  if q_ids is not None:
    same = q_ids == kv_ids
    visible = same if visible is None else visible & same
  if visible is not None:
    s = jnp.where(visible, s, MASK_VALUE)
  if kv_len is not None:
    s = jnp.where(col < kv_len, s, PAD_VALUE)
  return s, visible


# --------------------------------------------------------------------------------------------
# SSD tiles (both backends)


def decay_tile(hi_i, lo_i, hi_j, lo_j, keep):
  """exp(cs_i - cs_j), clamped to <= 0 before the exp, zero where not `keep` (None: keep all)."""
  seg = (hi_i - hi_j) + (lo_i - lo_j)
  lm = jnp.exp(jnp.minimum(seg, 0.0))
  return lm if keep is None else jnp.where(keep, lm, 0.0)


def silu_and_grad(z):
  sig = jax.nn.sigmoid(z)
  return z * sig, sig * (1.0 + z * (1.0 - sig))


def store_scan_output(rf, y):
  """The chunk scan's last step: store y, or with a z gate y * silu(z) and the pre-gate y as "u"
  (which the backward needs). rf: the kernel's refs by name."""
  if "z" in rf:
    rf["u"][...] = y.astype(rf["u"].dtype)
    y = y * silu_and_grad(rf["z"][...].astype(f32))[0]
  rf["out"][...] = y.astype(rf["out"].dtype)


# --------------------------------------------------------------------------------------------
# Under a mesh: one kernel call per device, inside shard_map over the batch axes
#
# GSPMD cannot partition a pallas_call (it would gather q, k, v or x onto every device and run the
# whole batch everywhere), so under a multi-device mesh the kernels run inside jax.shard_map, each
# device on its slice of the batch. The mesh is the ambient one, jax.sharding.get_abstract_mesh(),
# i.e. what `with jax.set_mesh(mesh):` (or jax.sharding.use_abstract_mesh, for export) put in
# context around the trace; the caller that shards the batch sets it. Without one, or with one
# device, the kernel is called directly.

BATCH_AXES = ("data", "fsdp")  # the mesh axes that split the batch (train/mesh.py's axis names)


def ambient_mesh():
  """The mesh in context when it spans more than one device and none of its axes is manual, else None.

  Inside a caller's shard_map (manual axes) the caller has already split the work: the kernel is called
  directly on what it was given.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or getattr(mesh, "manual_axes", ()):
    return None
  return mesh


def sharded_ok():
  """Whether a Pallas kernel runs per device here: one device, or an ambient mesh to shard_map over. With
  several devices and no mesh in context a bare pallas_call is left to GSPMD, which replicates it."""
  return jax.device_count() == 1 or ambient_mesh() is not None


def batch_axes(mesh, batch):
  """The mesh axes that split a batch of `batch`: BATCH_AXES in the mesh's order, each kept only if the
  product of the sizes kept so far and its own divides the batch. Devices along every other axis (a batch
  axis that does not fit, any non-batch axis) hold their slice whole and compute it redundantly."""
  axes, n = [], 1
  for name in mesh.axis_names:
    if name in BATCH_AXES and batch % (n * mesh.shape[name]) == 0:
      axes.append(name)
      n *= mesh.shape[name]
  return tuple(axes)


def shard_batch(kernel, args, batched):
  """kernel(*args), run per device under the ambient mesh (see above) or directly without one.

  args: arrays or None (an optional input not given); batched[i]: whether args[i] has the batch as its
  leading axis (split over batch_axes) or is replicated (parameters such as A, D, dt_bias).
  Every output of `kernel` must have the batch as its leading axis. Specs: in P(batch axes) or P(),
  out P(batch axes). check_vma is off: a pallas_call's outputs carry no varying-axes type. Its transpose
  then sums a replicated input's cotangent over the devices (psum) and splits an output cotangent over
  the axes it is replicated on, which is the right gradient in both cases.
  """
  mesh = ambient_mesh()
  if mesh is None:
    return kernel(*args)
  batch = next(a.shape[0] for a, b in zip(args, batched) if a is not None and b)
  spec = PartitionSpec(batch_axes(mesh, batch) or None)
  present = [i for i, a in enumerate(args) if a is not None]

  def per_device(*xs):
    full = [None] * len(args)
    for i, x in zip(present, xs):
      full[i] = x
    return kernel(*full)

  in_specs = tuple(spec if batched[i] else PartitionSpec() for i in present)
  return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(
      *[args[i] for i in present])
