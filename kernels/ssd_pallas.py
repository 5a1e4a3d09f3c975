"""Mamba-2 SSD scan as Pallas kernels (forward and backward) for GPU (Triton) and TPU (Mosaic).

``ssd_pallas(...)`` computes what ``kernels.ssd(..., impl="xla")`` computes (same arguments, same
seq_idx / initial_states / final_states conventions; see kernels/ssd.py) with the chunked SSD
algorithm of the Mamba-2 paper written as Pallas kernels, differentiable through ``jax.custom_vjp``.
Nothing of size (chunk x chunk) ever goes to memory: the forward saves the chunk states (one
(headdim, dstate) float32 state per chunk and head, which would be expensive to recompute) and,
with ``z``, the pre-gate output; the backward recomputes every intra-chunk term tile by tile.

Notation: per batch element and head, chunk c of Q positions, dA_t = dt_t * A (<= 0),
cs_i = sum of dA over the chunk up to i (inclusive), tail_j = sum of dA over (j, chunk end],
total = the chunk's sum; "x" below is the kernel input, X_j = dt_j x_j.

Decomposition (forward):
  (a) XLA, O(L h): dt processing (shared with the other impls), dA, the per-chunk cumulative sums
      cs (as a compensated hi + lo pair, see Numerics), tail, total, and from them the per-position
      weights e_i = exp(cs_i) (entering state -> y_i), l_j = exp(tail_j) (x_j -> chunk-end state)
      and the chunk decay gamma_c = exp(total_c), each already masked for document boundaries.
  (b) kernel "outer": chunk states S_c = sum_j dt_j l_j x_j B_j^T, (headdim, dstate) per chunk.
  (c) kernel "pass": the inter-chunk recurrence H_{c+1} = gamma_c H_c + S_c, sequential over chunks
      inside one kernel (GPU: a fori_loop over chunks per (batch, head, headdim tile), the state in
      registers; TPU: the chunk axis is an "arbitrary" grid axis, the state in VMEM scratch). It
      writes the state entering every chunk (saved for the backward) and the final state.
  (d) kernel "scan": y_i = sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) X_j + e_i C_i . H_c, + D x_i,
      * silu(z_i): the intra-chunk product masked by the decay matrix, computed tile by tile.
Backward:
  (e) XLA, O(L h p): the z gate and D skip (du = dy * silu(z), dz, dD) from the saved pre-gate output.
  (f) kernel "outer" again: dH contributions sum_i e_i du_i C_i^T per chunk.
  (g) kernel "pass" again, reversed over chunks: dH_c = gamma_c dH_{c+1} + (f)_c; it also returns
      d gamma_c = <dH_{c+1}, H_c> (from the saved states) and d initial_states.
  (h) the heavy O(L Q (p + n)) part, recomputing C B^T and the decay tiles:
      GPU: two kernels in FlashAttention-2 style, no atomics: a "row" kernel over tiles of output
      positions i (dC, and per row tile its share of the intra-chunk d dA) and a "column" kernel
      over tiles of input positions j (dx, dB, d dt); TPU: one kernel per (batch, chunk, group,
      head) doing both on the whole chunk. dB / dC are summed over the heads of a group inside
      the kernels (over ``BlockSizes.heads`` heads per program on GPU, all heads of the group on
      TPU), the remaining partial sums in XLA. The D skip's dx is added in the column kernel.
  (i) XLA, O(L h): d dA from the per-position gradients of cs / tail / total (a reverse and a
      forward cumulative sum per chunk), then d dt, d A.

Targets (``target=``, default from ``jax.default_backend()``), one module of kernels each, driven
through ``_BACKENDS`` by the one custom_vjp below (both take and return the same canonical layouts):
* ``"gpu"``: kernels/ssd_pallas_gpu.py, Pallas on the Triton backend; tiles of a chunk per program.
* ``"tpu"``: kernels/ssd_pallas_tpu.py, Pallas TPU (Mosaic); whole chunks per program.
What they share (the matmul, the decay tile, index math) is in kernels/pallas_common.py.
The SSD result does not depend on the chunk length (up to rounding), so rounding it is safe.

Numerics (the XLA path's safeguards): every product accumulates in float32; matmul operands are in
the input dtype (bf16 operands for bf16 inputs, like mamba_ssm's kernels; float32 inputs use
Precision.HIGHEST, no TF32); all elementwise math is float32. Every exponent is clamped at <= 0 and
masks are applied to the exp's result, so nothing can overflow. Segment sums cs_i - cs_j: a plain
difference of running sums loses precision after a strongly decaying stretch (|cs| ~ 1e3 leaves
~1e-4 absolute error in a small difference); cs is computed in XLA as a double-float (hi, lo) pair
with a compensated associative scan and the kernels form (hi_i - hi_j) + (lo_i - lo_j), which is
accurate to float32 rounding of the difference itself. e, l and gamma are single-signed running
sums, computed directly (no differences). The intra-chunk d dA avoids the textbook
"row sums minus column sums, then a reverse cumsum", which cancels most of its terms (~1e-4
relative error in dA on random inputs), by prefix sums inside the kernels (see _intra_ddA; ~1e-6).
Gradients of the clamps are taken as if unclamped (the clamps only act outside the A < 0, dt >= 0
contract, where all paths differ from the reference).

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

from altbench.kernels import ssd_pallas_gpu, ssd_pallas_tpu, tuning
from altbench.kernels.pallas_common import (LANES, TARGETS, backend_target, f32, pow2_at_least, round_up,
                                            silu_and_grad)

# The module, not the function of the same name that kernels/__init__.py exports.
_ssd = importlib.import_module("altbench.kernels.ssd")

MAX_HEADDIM = 256
MAX_DSTATE = 256
_BACKENDS = {"gpu": ssd_pallas_gpu, "tpu": ssd_pallas_tpu}

__all__ = ["BlockSizes", "TARGETS", "backend_target", "default_block_sizes", "internal_chunk",
           "ssd_pallas", "supported"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the GPU kernels (the TPU kernels always take whole chunks and whole groups).

  block_m: rows (output positions i) per program of the scan and backward-row kernels.
  block_k: columns (input positions j) per inner step; also the rows per program of the
    backward-column kernel and the inner step of the chunk-state kernel.
  block_p: headdim rows of the state per program of the state-passing kernel.
  heads: heads per program of the two GPU backward kernels (they accumulate dB / dC over them;
    must divide nheads / ngroups; a power of two). TPU always takes all heads of a group.
  num_warps, num_stages: Triton launch parameters, shared by all kernels.
  """
  block_m: int = 64
  block_k: int = 64
  block_p: int = 32
  heads: int = 4
  num_warps: int = 4
  num_stages: int = 2


# Not tuned on hardware (none was available when this was written). 64 x 64 tiles keep the
# float32 (block_m, block_k) score-like tiles and a (64, dstate) accumulator in registers at 4
# warps for headdim 64 / dstate 128; 8 warps from headdim or dstate 256 on.
_GPU_DEFAULT = BlockSizes()

def internal_chunk(target, chunk_size, seqlen):
  """The chunk length the kernels use: a power of two >= 16 (GPU) or a multiple of 128 (TPU),
  at least chunk_size, but no longer than the padded sequence needs."""
  if target == "gpu":
    return min(max(16, pow2_at_least(chunk_size)), max(16, pow2_at_least(seqlen)))
  return min(round_up(max(chunk_size, 1), LANES), round_up(max(seqlen, 1), LANES))


def _largest_pow2_divisor(n, cap):
  d = 1
  while d * 2 <= cap and n % (d * 2) == 0:
    d *= 2
  return d


def default_block_sizes(target, q, heads_per_group, headdim, dstate):
  """Block sizes for a call (q = internal chunk length)."""
  if target == "tpu":
    return BlockSizes(block_m=q, block_k=q, block_p=headdim, heads=heads_per_group)
  tuned = tuning.lookup("ssd_pallas", tuning.ssd_class(headdim, dstate))
  if tuned:
    return _fit_blocks(BlockSizes(**tuned), target, q, heads_per_group, headdim)
  big = max(headdim, dstate) >= 256
  bs = dataclasses.replace(_GPU_DEFAULT, num_warps=8 if big else _GPU_DEFAULT.num_warps,
                           block_m=32 if big else _GPU_DEFAULT.block_m)
  return _fit_blocks(bs, target, q, heads_per_group, headdim)


def _fit_blocks(bs, target, q, heads_per_group, headdim):
  if target == "tpu":
    return BlockSizes(block_m=q, block_k=q, block_p=headdim, heads=heads_per_group,
                      num_warps=bs.num_warps, num_stages=bs.num_stages)
  fit = lambda v: max(16, min(pow2_at_least(v), q))
  return dataclasses.replace(bs, block_m=fit(bs.block_m), block_k=fit(bs.block_k),
                             block_p=max(1, min(pow2_at_least(bs.block_p), headdim)),
                             heads=_largest_pow2_divisor(heads_per_group, max(1, bs.heads)))


def supported(x_shape, B_shape, dtype=None):
  """Whether ssd_pallas handles this call (kernels.ssd's auto dispatch asks)."""
  ok_dtype = dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                                   jnp.dtype(jnp.float16))
  return ok_dtype and x_shape[-1] <= MAX_HEADDIM and B_shape[-1] <= MAX_DSTATE


# --------------------------------------------------------------------------------------------
# One call, statically


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static description of one call on padded arrays (hashable: a custom_vjp nondiff argument)."""
  target: str         # a key of _BACKENDS
  q: int              # internal chunk length
  nc: int             # number of chunks (padded length = nc * q)
  r: int              # heads per group
  has_doc: bool
  has_D: bool
  has_z: bool
  has_h0: bool
  blocks: BlockSizes
  interpret: object   # False, True, or a pltpu.InterpretParams


# --------------------------------------------------------------------------------------------
# XLA glue: per-position vectors (a) and the d dA assembly (i)


def _dd_add(a, b):
  """Double-float addition of (hi, lo) pairs (TwoSum, then renormalise)."""
  a_hi, a_lo = a
  b_hi, b_lo = b
  s = a_hi + b_hi
  bp = s - a_hi
  err = (a_hi - (s - bp)) + (b_hi - bp)
  lo = err + (a_lo + b_lo)
  hi = s + lo
  return hi, lo - (hi - s)


def _vectors(dt_BLH, A_H, doc_BL, q):
  """Per-position float32 vectors (b, h, Lp) for the kernels, and gamma (b, h, nc)."""
  b, lp, h = dt_BLH.shape
  nc = lp // q
  dt_BHL = jnp.swapaxes(dt_BLH, 1, 2)
  dA_BHCQ = (dt_BHL * A_H[:, None]).reshape(b, h, nc, q)
  hi, lo = lax.associative_scan(_dd_add, (dA_BHCQ, jnp.zeros_like(dA_BHCQ)), axis=3)
  # Reverse inclusive sums; the exclusive one by a shift (never by subtracting dA_j).
  rev = jnp.flip(jnp.cumsum(jnp.flip(dA_BHCQ, 3), axis=3), 3)
  tail = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=3)
  total = rev[..., 0]
  e = jnp.exp(jnp.minimum(hi, 0.0))
  l = jnp.exp(jnp.minimum(tail, 0.0))
  gamma = jnp.exp(jnp.minimum(total, 0.0))
  if doc_BL is not None:
    doc_BCQ = doc_BL.reshape(b, nc, q)
    # The document live on entering chunk c: the one that ended chunk c-1 (for c = 0 the leading
    # document, which initial_states seed). Ids are non-decreasing (kernels.ssd._document_ids).
    enter_BC = jnp.concatenate([doc_BCQ[:, :1, 0], doc_BCQ[:, :-1, -1]], axis=1)
    end_BC = doc_BCQ[:, :, -1]
    e = jnp.where((doc_BCQ == enter_BC[..., None])[:, None], e, 0.0)
    l = jnp.where((doc_BCQ == end_BC[..., None])[:, None], l, 0.0)
    gamma = jnp.where((end_BC == enter_BC)[:, None], gamma, 0.0)
  flat = lambda v: v.reshape(b, h, lp)
  return dict(dt=dt_BHL, hi=flat(hi), lo=flat(lo), e=flat(e), l=flat(l), gamma=gamma)


def _ddA(dhead_BHL, dtail_BHL, tcs_BHL, dgamma_BHC, gamma_BHC, q):
  """d dA_k from the gradients w.r.t. cs_i = sum_{k<=i} dA_k through e (dhead), tail_j =
  sum_{k>j} dA_k (dtail), total (d gamma) and the segment sums cs_i - cs_j (tcs, _intra_ddA)."""
  b, h, lp = dhead_BHL.shape
  chunks = lambda a: a.reshape(b, h, -1, q)
  dhead, dtail, tcs = chunks(dhead_BHL), chunks(dtail_BHL), chunks(tcs_BHL)
  shift = lambda a: jnp.concatenate([jnp.zeros_like(a[..., :1]), a[..., :-1]], axis=3)
  from_head = jnp.flip(jnp.cumsum(jnp.flip(dhead, 3), axis=3), 3)          # sum over i >= k
  from_tail = shift(jnp.cumsum(dtail, axis=3))                            # sum over j < k
  ddA = from_head + from_tail + shift(tcs) + (dgamma_BHC * gamma_BHC)[..., None]
  return ddA.reshape(b, h, lp)


# _intra_ddA, the intra-chunk part of d dA. With G_ij = dL_ij L_ij the gradient w.r.t. the
# segment sum cs_i - cs_j (pairs j <= i), d dA_k = sum_{i >= k > j} G_ij: the pairs whose segment
# (j, i] contains k. The textbook route (d cs_i = rowsum_i G - colsum_i G, then a reverse cumsum)
# is exact in exact arithmetic but cancels all pairs with j >= k, which hold most of G's mass when
# decay is strong: up to ~1e-4 relative error in dA measured on random inputs. Instead each row
# takes an inclusive prefix sum over j, I_ik = sum_{j <= k} G_ij, and T_k = sum_{i > k} I_ik, so
# that d dA_{k+1} = T_k (and d dA_0 = 0 within a chunk): no cancellation (~1e-6 in the same test).
# The kernels compute T (their "tcs" output): GPU by row tiles, TPU per whole chunk.


# --------------------------------------------------------------------------------------------
# One custom_vjp over the backend kernels (inputs padded, dt processed)


def _core_fwd_impl(c, x, dt, A, B, C, D, z, h0, doc):
  ops = _BACKENDS[c.target]
  v = _vectors(dt, A, doc, c.q)
  S = ops.outer(c, x, B, v["dt"] * v["l"])
  H, final, _ = ops.state_pass(c, S, v["gamma"], h0)
  out, u = ops.scan_fwd(c, x, B, C, v, doc, H, D, z)
  return out, final, (x, dt, A, B, C, D, z, h0, doc, H, u)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(c, x, dt, A, B, C, D, z, h0, doc):
  out, final, _ = _core_fwd_impl(c, x, dt, A, B, C, D, z, h0, doc)
  return out, final


def _core_fwd(c, x, dt, A, B, C, D, z, h0, doc):
  out, final, res = _core_fwd_impl(c, x, dt, A, B, C, D, z, h0, doc)
  return (out, final), res


def _core_bwd(c, res, cts):
  x, dt, A, B, C, D, z, h0, doc, H, u = res
  dout, dfinal = cts
  ops = _BACKENDS[c.target]
  v = _vectors(dt, A, doc, c.q)
  dout = dout.astype(f32)
  dz = None
  if c.has_z:
    silu, dsilu = silu_and_grad(z.astype(f32))
    dz = (dout * u.astype(f32) * dsilu).astype(z.dtype)
    dout = dout * silu
  dD = jnp.einsum("blhp,blhp->hp", dout, x.astype(f32)) if c.has_D else None
  du = dout.astype(x.dtype)
  G = ops.outer(c, du, C, v["e"])
  dS, dh0, dgamma = ops.state_pass(c, G, v["gamma"], dfinal.astype(f32), reverse=True, hf=H)
  dx, dB, dC, ddt_intra, ddt_state, dhead, tcs = ops.bwd(c, x, B, C, du, v, doc, H, dS, D)
  dtail = v["dt"] * ddt_state               # l_j = exp(tail_j): d tail_j = d l_j * l_j = dt_j * ddt_state_j
  ddA = _ddA(dhead, dtail, tcs, dgamma, v["gamma"], c.q)
  ddt_BHL = ddt_intra + ddt_state + A[:, None] * ddA
  dA = jnp.sum(ddA * v["dt"], axis=(0, 2))
  return (dx, jnp.swapaxes(ddt_BHL, 1, 2), dA, dB.astype(B.dtype), dC.astype(C.dtype), dD, dz,
          dh0 if c.has_h0 else None, None)


_core.defvjp(_core_fwd, _core_bwd)


# --------------------------------------------------------------------------------------------
# Public entry point


def ssd_pallas(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
               seq_idx=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
               *, target=None, interpret=None, block_sizes=None):
  """kernels.ssd with impl="pallas" (same arguments and results; see kernels/ssd.py).

  target: "gpu" (Triton) or "tpu" (Mosaic); default from jax.default_backend(), and "gpu" kernels
    (interpreted) on a backend that has neither.
  interpret: run in Pallas interpret mode; default True exactly when the backend is not `target`'s.
  block_sizes: a BlockSizes for the GPU kernels (clamped to the chunk); default per call.
  """
  _ssd._check_shapes(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx)
  backend = jax.default_backend()
  target = target or backend_target(backend) or "gpu"
  if target not in TARGETS:
    raise ValueError(f"ssd_pallas: target={target!r} is not one of {TARGETS}")
  if x.shape[-1] > MAX_HEADDIM:
    raise NotImplementedError(f"ssd_pallas: headdim (x.shape[-1]) {x.shape[-1]} > {MAX_HEADDIM}")
  if B.shape[-1] > MAX_DSTATE:
    raise NotImplementedError(f"ssd_pallas: dstate (B.shape[-1]) {B.shape[-1]} > {MAX_DSTATE}")
  if not supported(x.shape, B.shape, x.dtype):
    raise NotImplementedError(f"ssd_pallas: x dtype {x.dtype} (float32, bfloat16, float16 only)")
  if interpret is None:
    interpret = backend != target
  return _ssd_pallas_jit(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                         chunk_size=int(chunk_size), dt_softplus=bool(dt_softplus),
                         dt_limit=tuple(float(v) for v in dt_limit),
                         return_final_states=bool(return_final_states), target=target,
                         interpret=interpret, block_sizes=block_sizes)


@functools.partial(jax.jit, static_argnames=("chunk_size", "dt_softplus", "dt_limit", "return_final_states",
                                             "target", "interpret", "block_sizes"))
def _ssd_pallas_jit(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, *, chunk_size, dt_softplus,
                    dt_limit, return_final_states, target, interpret, block_sizes):
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  dtype = jnp.result_type(x.dtype, B.dtype, C.dtype)
  dt_BLH = _ssd._process_dt(dt, dt_bias, dt_softplus, dt_limit)
  doc_BL = None if seq_idx is None else _ssd._document_ids(seq_idx)
  q = internal_chunk(target, chunk_size, l)
  nc = max(1, math.ceil(l / q))
  lp = nc * q
  if target == "gpu":
    pp, nn = max(16, pow2_at_least(p)), max(16, pow2_at_least(n))
  else:
    pp, nn = round_up(p, LANES), round_up(n, LANES)
  blocks = (default_block_sizes(target, q, h // g, pp, nn) if block_sizes is None
            else _fit_blocks(block_sizes, target, q, h // g, pp))
  c = _Cfg(target=target, q=q, nc=nc, r=h // g, has_doc=doc_BL is not None, has_D=D is not None,
           has_z=z is not None, has_h0=initial_states is not None, blocks=blocks, interpret=interpret)

  # Zero padding: dt = 0 makes a padded step the identity (decay 1, no input), zero channels stay
  # zero; padded positions continue the last document. Everything padded is sliced off below.
  def pad(a, axis_len=None, last=None):
    widths = [(0, 0)] * a.ndim
    if axis_len is not None:
      widths[1] = (0, lp - l)
    if last is not None:
      widths[-1] = (0, last - a.shape[-1])
    return jnp.pad(a, widths)

  xp = pad(x.astype(dtype), True, pp)
  Bp, Cp = pad(B.astype(dtype), True, nn), pad(C.astype(dtype), True, nn)
  dtp = pad(dt_BLH, True)
  zp = None if z is None else pad(z, True, pp)
  Dp = None
  if D is not None:
    Dp = pad(jnp.broadcast_to(D.astype(f32).reshape(h, -1), (h, p)), None, pp)
  h0 = None
  if initial_states is not None:
    h0 = jnp.pad(initial_states.astype(f32), ((0, 0), (0, 0), (0, pp - p), (0, nn - n)))
  docp = None
  if doc_BL is not None:
    docp = jnp.pad(doc_BL, ((0, 0), (0, lp - l)), mode="edge" if l else "constant")
  out, final = _core(c, xp, dtp, A.astype(f32), Bp, Cp, Dp, zp, h0, docp)
  y = out[:, :l, :, :p].astype(x.dtype)
  if return_final_states:
    return y, final[:, :, :p, :n]
  return y
