"""Gated delta rule as Pallas kernels (forward and backward) for GPU (Triton) and TPU (Mosaic).

``gated_delta_pallas(...)`` computes what ``kernels.gated_delta(..., impl="xla")`` computes (same
arguments, same seq_idx / initial_state / final state conventions; see kernels/gated_delta.py) with the
chunked algorithm written as Pallas kernels, differentiable through one ``jax.custom_vjp``.

Design. The per-chunk work of the delta rule is not a sum of independent pieces as in the SSD (where chunk
states, state passing and the intra-chunk scan are separate kernels): the chunk's delta-rule values
V' = U - W S need the entering state S, and the chunk's state update needs V'. Three kernels:
* "inverse", parallel over (chunk, batch, head): T = (I + A)^-1 of every chunk, the one state-independent
  piece that is not a matmul (forward substitution, chunk sequential steps of chunk x chunk elementwise
  work): done with full parallelism rather than inside the sequential loops. T (float32, one chunk x chunk
  matrix per chunk and head, a quarter of the entering states' size at dk = dv = 128, chunk 64) is saved
  for the backward.
* forward, one program per (batch, head [, dv tile]) walking the chunks in order with the (dk, dv) state
  on chip: per chunk G, U, W, V' = U - W S, the output O and the next state (matmuls and elementwise
  work only); it writes the state entering each chunk (float32, saved for the backward).
* backward: the chunks in reverse, carrying dS (the gradient of the state leaving the chunk); per chunk it
  recomputes the forward's chunk-local quantities from the saved entering state and T and applies the
  hand-derived gradients (through T too: dA = -T^T dT T^T).
The chunk math is one set of bodies, kernels/gated_delta_chunk.py, run by both backends (and tested there
in float64 against jax.vjp of its forward). Backends, one module each, driven through ``_BACKENDS``:
* ``"gpu"``: kernels/gated_delta_pallas_gpu.py, Triton; the sequential kernels on grid (batch, head, dv
  tile): the state columns, and all of the forward, split over dv tiles (``BlockSizes.block_v``) for
  parallelism, the dv-independent work (G, W) repeated per tile. In the backward the gradients w.r.t. q,
  k, beta and g are sums over the dv tiles (everything is linear in the tile's cotangents); each tile
  writes its partial sums, added up in XLA.
* ``"tpu"``: kernels/gated_delta_pallas_tpu.py, Mosaic; the sequential kernels on grid (batch, head,
  chunk) with the chunk axis "arbitrary" and the state in VMEM scratch; whole dv.
Compared with flash-linear-attention's chunk_gated_delta_rule (a parallel kernel for T, then W and U of all
chunks written to memory, a sequential state kernel writing V' and the states, a parallel output kernel):
here W, U, V' and O are computed inside the sequential kernel and never go to memory, at the price of
less parallelism in that kernel (batch x heads x dv tiles programs). Which split is faster on a given GPU
has not been measured (no GPU was available when this was written; experiments/bench/gated_delta.py has
the comparison with the XLA path).

XLA glue (O(L h)): padding (length to whole chunks with identity steps g = 0, beta = 0, q = k = v = 0;
dk, dv to powers of two >= 16 on GPU, multiples of 128 on TPU), the within-chunk cumulative sums of g as a
compensated (hi, lo) pair (kernels/ssd_pallas.py's double-float scan), the document masks (the entering
state reaches only the positions of its document: ``ent``), and the sums of the GPU backward's partials.

Numerics: float32 accumulation; matmul operands in the input dtype (bf16 in: bf16 operands, like
flash-linear-attention's kernels; float32 in: Precision.HIGHEST, no TF32); elementwise math float32.
Segment decays (hi_i - hi_j) + (lo_i - lo_j), exponents clamped at <= 0; the gradient w.r.t. g is formed
without cancelling differences (kernels/gated_delta_chunk.py).

On CPU (or with ``interpret=True``) the kernels run in Pallas interpret mode: slow, for tests only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import jax
import jax.numpy as jnp
from jax import lax

from altbench.kernels import gated_delta_pallas_gpu, gated_delta_pallas_tpu, tuning
from altbench.kernels.pallas_common import LANES, TARGETS, backend_target, f32, pow2_at_least, round_up
from altbench.kernels.ssd import _document_ids
from altbench.kernels.ssd_pallas import _dd_add

MAX_DK = 256
MAX_DV = 256
_BACKENDS = {"gpu": gated_delta_pallas_gpu, "tpu": gated_delta_pallas_tpu}

__all__ = ["BlockSizes", "TARGETS", "backend_target", "default_block_sizes", "gated_delta_pallas",
           "internal_chunk", "supported"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Launch parameters of the GPU kernels (the TPU kernels take whole chunks and the whole dv).

  block_v: state columns (dv) per program; a power of two (clamped to the padded dv).
  num_warps, num_stages: Triton launch parameters.
  """
  block_v: int = 64
  num_warps: int = 8
  num_stages: int = 1


# Not tuned on hardware (none was available when this was written): a program holds several float32
# chunk x chunk matrices (G, A^T, T, Qs K^T, ...) and (chunk, dk) tiles, hence 8 warps.
_GPU_DEFAULT = BlockSizes()


def internal_chunk(target, chunk_size, seqlen):
  """The chunk length the kernels use: a power of two >= 16 (GPU) or a multiple of 128 (TPU), at least
  chunk_size, but no longer than the padded sequence needs."""
  if target == "gpu":
    return min(max(16, pow2_at_least(chunk_size)), max(16, pow2_at_least(seqlen)))
  return min(round_up(max(chunk_size, 1), LANES), round_up(max(seqlen, 1), LANES))


def default_block_sizes(target, dk, dv):
  """Block sizes for a call (dk, dv padded); the tuned table's entry where there is one."""
  tuned = tuning.lookup("gated_delta_pallas", tuning.gated_delta_class(dk, dv)) if target == "gpu" else None
  return _fit_blocks(BlockSizes(**tuned) if tuned else _GPU_DEFAULT, dv)


def _fit_blocks(bs, dv):
  return dataclasses.replace(bs, block_v=max(16, min(pow2_at_least(bs.block_v), dv)))


def supported(q_shape, v_shape, dtype=None):
  """Whether gated_delta_pallas handles this call (kernels.gated_delta's auto dispatch asks)."""
  ok_dtype = dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                                   jnp.dtype(jnp.float16))
  return ok_dtype and q_shape[-1] <= MAX_DK and v_shape[-1] <= MAX_DV


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static description of one call on padded arrays (hashable: a custom_vjp nondiff argument)."""
  target: str         # a key of _BACKENDS
  chunk: int          # internal chunk length
  nc: int             # number of chunks (padded length = nc * chunk)
  scale: float
  has_doc: bool
  has_s0: bool
  blocks: BlockSizes
  interpret: object   # False, True, or a pltpu.InterpretParams


def _vectors(c, g_BLH, beta_BLH, doc_BL):
  """Per-position float32 vectors of the kernels as columns (b, h, Lp, 1) and rows (b, h, 1, Lp):
  hi / lo (the compensated within-chunk cumsum of g), beta; doc ids and ent (1 where a position is in the
  document of the state entering its chunk) as columns (b, Lp, 1) and rows (b, 1, Lp). (Reshapes only: the
  GPU kernels read both forms, the TPU kernels the rows.)"""
  b, lp, h = g_BLH.shape
  g_BHNC = jnp.swapaxes(g_BLH, 1, 2).reshape(b, h, c.nc, c.chunk)
  hi, lo = lax.associative_scan(_dd_add, (g_BHNC, jnp.zeros_like(g_BHNC)), axis=3)
  col = lambda a: a.reshape(b, -1, lp, 1)
  row = lambda a: a.reshape(b, -1, 1, lp)
  beta_BHL = jnp.swapaxes(beta_BLH, 1, 2)
  vec = dict(hi=col(hi), lo=col(lo), hi_r=row(hi), lo_r=row(lo), beta=col(beta_BHL), beta_r=row(beta_BHL))
  if doc_BL is not None:
    doc_BNC = doc_BL.reshape(b, c.nc, c.chunk)
    # The document live on entering chunk n: the one at the end of chunk n-1 (for n = 0 the leading
    # document, which initial_state seeds).
    enter_BN = jnp.concatenate([doc_BNC[:, :1, 0], doc_BNC[:, :-1, -1]], axis=1)
    ent = (doc_BNC == enter_BN[:, :, None]).astype(f32)
    vec.update(doc=doc_BL.reshape(b, lp, 1), doc_r=doc_BL.reshape(b, 1, lp), ent=ent.reshape(b, lp, 1),
               ent_r=ent.reshape(b, 1, lp))
  return vec


def _core_fwd_impl(c, q, k, v, g, beta, s0, doc):
  ops = _BACKENDS[c.target]
  vec = _vectors(c, g, beta, doc)
  T = ops.inverse(c, k, vec)
  o, final, s_in = ops.fwd(c, q, k, v, vec, T, s0)
  return o, final, (q, k, v, g, beta, s0, doc, T, s_in)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(c, q, k, v, g, beta, s0, doc):
  o, final, _ = _core_fwd_impl(c, q, k, v, g, beta, s0, doc)
  return o, final


def _core_fwd(c, q, k, v, g, beta, s0, doc):
  o, final, res = _core_fwd_impl(c, q, k, v, g, beta, s0, doc)
  return (o, final), res


def _core_bwd(c, res, cts):
  q, k, v, g, beta, s0, doc, T, s_in = res
  do, dfinal = cts
  vec = _vectors(c, g, beta, doc)
  dq, dk, dv, dbeta_BHL, dg_BHL, ds0 = _BACKENDS[c.target].bwd(c, q, k, v, vec, T, s_in, do.astype(v.dtype),
                                                                dfinal.astype(f32))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.swapaxes(dg_BHL, 1, 2),
          jnp.swapaxes(dbeta_BHL, 1, 2), ds0 if c.has_s0 else None, None)


_core.defvjp(_core_fwd, _core_bwd)


def gated_delta_pallas(q, k, v, g, beta, *, scale=None, initial_state=None, return_final_state=False,
                       seq_idx=None, chunk_size=64, target=None, interpret=None, block_sizes=None):
  """kernels.gated_delta with impl="pallas" (same arguments and results; see kernels/gated_delta.py).

  target: "gpu" (Triton) or "tpu" (Mosaic); default from jax.default_backend(), and "gpu" kernels
    (interpreted) on a backend that has neither.
  interpret: run in Pallas interpret mode; default True exactly when the backend is not `target`'s.
  block_sizes: a BlockSizes for the GPU kernels; default per call (the tuned table, else _GPU_DEFAULT).
  """
  # The module (the package attribute kernels.gated_delta is the function); imported here: it imports this one.
  importlib.import_module("altbench.kernels.gated_delta")._check_args(q, k, v, g, beta, scale, initial_state,
                                                                      seq_idx, chunk_size, "pallas")
  backend = jax.default_backend()
  target = target or backend_target(backend) or "gpu"
  if target not in TARGETS:
    raise ValueError(f"gated_delta_pallas: target={target!r} is not one of {TARGETS}")
  if q.shape[-1] > MAX_DK or v.shape[-1] > MAX_DV:
    raise NotImplementedError(f"gated_delta_pallas: dk {q.shape[-1]}, dv {v.shape[-1]}: at most "
                              f"{MAX_DK}, {MAX_DV}")
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  if not supported(q.shape, v.shape, dtype):
    raise NotImplementedError(f"gated_delta_pallas: dtype {dtype} (float32, bfloat16, float16 only)")
  if interpret is None:
    interpret = backend != target
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  return _gated_delta_pallas_jit(q, k, v, g, beta, initial_state, seq_idx, scale=scale,
                                 chunk_size=int(chunk_size), return_final_state=bool(return_final_state),
                                 target=target, interpret=interpret, block_sizes=block_sizes)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size", "return_final_state", "target", "interpret",
                                             "block_sizes"))
def _gated_delta_pallas_jit(q, k, v, g, beta, initial_state, seq_idx, *, scale, chunk_size, return_final_state,
                            target, interpret, block_sizes):
  b, l, h, dk = q.shape
  dv = v.shape[-1]
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  chunk = internal_chunk(target, chunk_size, l)
  nc = max(1, math.ceil(l / chunk))
  lp = nc * chunk
  if target == "gpu":
    dkp, dvp = max(16, pow2_at_least(dk)), max(16, pow2_at_least(dv))
  else:
    dkp, dvp = round_up(dk, LANES), round_up(dv, LANES)
  blocks = default_block_sizes(target, dkp, dvp) if block_sizes is None else _fit_blocks(block_sizes, dvp)
  doc_BL = None if seq_idx is None else _document_ids(seq_idx)
  c = _Cfg(target=target, chunk=chunk, nc=nc, scale=scale, has_doc=doc_BL is not None,
           has_s0=initial_state is not None, blocks=blocks, interpret=interpret)

  # Identity steps: g = 0, beta = 0, q = k = v = 0; padded positions continue the last document.
  def pad(a, last=None):
    widths = [(0, 0), (0, lp - l)] + [(0, 0)] * (a.ndim - 2)
    if last is not None:
      widths[-1] = (0, last - a.shape[-1])
    return jnp.pad(a, widths)

  qp, kp = pad(q.astype(dtype), dkp), pad(k.astype(dtype), dkp)
  vp = pad(v.astype(dtype), dvp)
  gp, betap = pad(g.astype(f32)), pad(beta.astype(f32))
  s0 = None
  if initial_state is not None:
    s0 = jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv)))
  docp = None
  if doc_BL is not None:
    docp = jnp.pad(doc_BL, ((0, 0), (0, lp - l)), mode="edge" if l else "constant").astype(jnp.int32)
  o, final = _core(c, qp, kp, vp, gp, betap, s0, docp)
  o = o[:, :l, :, :dv].astype(q.dtype)
  if return_final_state:
    return o, final[:, :, :dk, :dv]
  return o
