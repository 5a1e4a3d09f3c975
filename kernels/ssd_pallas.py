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

Targets (``target=``, default from ``jax.default_backend()``):
* ``"gpu"``: Pallas on the Triton backend, like kernels/flash_attention.py and for the same reasons:
  it runs on every NVIDIA GPU from Ampere (sm80) on, while Mosaic GPU is Hopper/Blackwell-only and
  far more intricate. Layout (b, L, h, p) untouched. Grids over (chunk x row tile, batch, head);
  tiles (``block_m`` rows x ``block_k`` columns of the chunk) are powers of two; headdim and dstate
  are zero-padded to powers of two (>= 16, the smallest Triton dot), the chunk length is rounded
  up to a power of two.
* ``"tpu"``: Pallas TPU (Mosaic). Whole chunks per program (Q x Q float32 tiles fit VMEM easily);
  layouts (b, h, L, p) / (b, g, L, n) so blocks are (rows, lanes) tiles; per-position vectors are
  (1, Q) lane rows; their column forms come from an aligned float32 transpose in the kernel, so the
  chunk length is rounded up to a multiple of 128 and headdim / dstate are zero-padded to multiples
  of 128 (the (8, 128) layout). Grids set ``dimension_semantics``: batch / chunk / group
  "parallel", the head-in-group axis "arbitrary" (it accumulates dB, dC and reuses C B^T in VMEM
  scratch), the chunk axis of the state passing "arbitrary".
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
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# The module, not the function of the same name that kernels/__init__.py exports.
_ssd = importlib.import_module("altbench.kernels.ssd")
# Pallas API-name compatibility helpers (jax 0.10 / 0.11) and the backend -> target rule are
# shared with the flash attention kernels.
from altbench.kernels import tuning
from altbench.kernels.flash_attention import (_cdiv, _fori, _idiv, _tpu_interpret_params, _tpu_params, _tpu_vmem,
                                     _triton_params, backend_target)

TARGETS = ("gpu", "tpu")
MAX_HEADDIM = 256
MAX_DSTATE = 256
_LANES = 128
f32 = jnp.float32

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


def _pow2_at_least(x):
  return 1 << max(0, int(x) - 1).bit_length()


def _round_up(x, m):
  return -(-x // m) * m


def internal_chunk(target, chunk_size, seqlen):
  """The chunk length the kernels use: a power of two >= 16 (GPU) or a multiple of 128 (TPU),
  at least chunk_size, but no longer than the padded sequence needs."""
  if target == "gpu":
    return min(max(16, _pow2_at_least(chunk_size)), max(16, _pow2_at_least(seqlen)))
  return min(_round_up(max(chunk_size, 1), _LANES), _round_up(max(seqlen, 1), _LANES))


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
  fit = lambda v: max(16, min(_pow2_at_least(v), q))
  return dataclasses.replace(bs, block_m=fit(bs.block_m), block_k=fit(bs.block_k),
                             block_p=max(1, min(_pow2_at_least(bs.block_p), headdim)),
                             heads=_largest_pow2_divisor(heads_per_group, max(1, bs.heads)))


def supported(x_shape, B_shape, dtype=None):
  """Whether ssd_pallas handles this call (kernels.ssd's auto dispatch asks)."""
  ok_dtype = dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                                   jnp.dtype(jnp.float16))
  return ok_dtype and x_shape[-1] <= MAX_HEADDIM and B_shape[-1] <= MAX_DSTATE


# --------------------------------------------------------------------------------------------
# Shared pieces


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static description of one call on padded arrays (hashable: a custom_vjp nondiff argument)."""
  target: str
  q: int              # internal chunk length
  nc: int             # number of chunks (padded length = nc * q)
  r: int              # heads per group
  has_doc: bool
  has_D: bool
  has_z: bool
  has_h0: bool
  blocks: BlockSizes
  interpret: object   # False, True, or a pltpu.InterpretParams


_DIMS = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}


def _dot(a, b, kind="nn"):
  """a @ b ("nn"), a @ b.T ("nt") or a.T @ b ("tn"), float32 accumulation; float32 operands are
  not rounded to TF32/bf16 (explicit either way, so a global default precision cannot change it)."""
  precision = lax.Precision.HIGHEST if a.dtype == f32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, (_DIMS[kind], ((), ())), precision=precision,
                         preferred_element_type=f32)


def _decay_tile(hi_i, lo_i, hi_j, lo_j, keep):
  """exp(cs_i - cs_j), clamped to <= 0 before the exp, zero where not `keep` (None: keep all)."""
  seg = (hi_i - hi_j) + (lo_i - lo_j)
  lm = jnp.exp(jnp.minimum(seg, 0.0))
  return lm if keep is None else jnp.where(keep, lm, 0.0)


def _silu_and_grad(z):
  sig = jax.nn.sigmoid(z)
  return z * sig, sig * (1.0 + z * (1.0 - sig))


def _refs(refs, names):
  """Kernel refs by name; names is the ordered list of present refs."""
  assert len(refs) == len(names), (len(refs), names)
  return dict(zip(names, refs))


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


# The intra-chunk part of d dA. With G_ij = dL_ij L_ij the gradient w.r.t. the segment sum
# cs_i - cs_j (pairs j <= i), d dA_k = sum_{i >= k > j} G_ij: the pairs whose segment (j, i]
# contains k. The textbook route (d cs_i = rowsum_i G - colsum_i G, then a reverse cumsum) is
# exact in exact arithmetic but cancels all pairs with j >= k, which hold most of G's mass when
# decay is strong: up to ~1e-4 relative error in dA measured on random inputs. Instead each row
# takes an inclusive prefix sum over j, I_ik = sum_{j <= k} G_ij, and T_k = sum_{i > k} I_ik, so
# that d dA_{k+1} = T_k (and d dA_0 = 0 within a chunk): no cancellation (~1e-6 in the same test).


# --------------------------------------------------------------------------------------------
# GPU (Triton) kernels. Canonical layouts: x, z, du (b, Lp, h, p); B, C (b, Lp, g, n);
# vectors (b, h, Lp); states (b, nc, h, p, n); doc ids (b, Lp) int32.


def _gpu_call(kernel, c, grid, in_specs, out_specs, out_shape, name, args):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_triton_params(c.blocks.num_warps, c.blocks.num_stages),
      interpret=c.interpret, name=name)(*args)


def _gpu_outer_kernel(u_ref, v_ref, w_ref, o_ref, *, c):
  """o = sum_j w_j u_j v_j^T over the chunk: (p, n)."""
  bk = c.blocks.block_k

  def body(kb, acc):
    ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    v = v_ref[ks, :]
    wv = (v.astype(f32) * w_ref[ks][:, None]).astype(v.dtype)
    return acc + _dot(u_ref[ks, :], wv, "tn")

  acc = jnp.zeros(o_ref.shape, f32)
  o_ref[...] = _fori(0, c.q // bk, body, acc)


def _gpu_outer(c, u, v, w):
  b, lp, h, pp = u.shape
  nn = v.shape[-1]
  q, r = c.q, c.r
  return _gpu_call(
      functools.partial(_gpu_outer_kernel, c=c), c, (c.nc, b, h),
      [pl.BlockSpec((None, q, None, pp), lambda ci, bi, hi: (bi, ci, hi, 0)),
       pl.BlockSpec((None, q, None, nn), lambda ci, bi, hi: (bi, ci, _idiv(hi, r), 0)),
       pl.BlockSpec((None, None, q), lambda ci, bi, hi: (bi, hi, ci))],
      pl.BlockSpec((None, None, None, pp, nn), lambda ci, bi, hi: (bi, ci, hi, 0, 0)),
      jax.ShapeDtypeStruct((b, c.nc, h, pp, nn), f32), "altbench_ssd_chunk_outer", (u, v, w))


def _gpu_pass_kernel(*refs, c, names, reverse):
  rf = _refs(refs, names)
  nc = c.nc
  state = rf["init"][...] if "init" in rf else jnp.zeros(rf["final"].shape, f32)

  def body(k, carry):
    state, dg = carry
    ci = nc - 1 - k if reverse else k
    rf["hin"][ci] = state
    if "hf" in rf:
      contrib = jnp.sum(state * rf["hf"][ci])
      dg = jnp.where(jnp.arange(dg.shape[0]) == ci, contrib, dg)
    return rf["gamma"][ci] * state + rf["s"][ci], dg

  dg = jnp.zeros((rf["dgamma"].shape[0],), f32) if "dgamma" in rf else jnp.zeros((1,), f32)
  state, dg = lax.fori_loop(0, nc, body, (state, dg))
  rf["final"][...] = state
  if "dgamma" in rf:
    rf["dgamma"][...] = dg


def _gpu_pass(c, s, gamma, init, reverse=False, hf=None):
  """States entering each chunk (in the direction of travel) and the last state.

  Forward: hin_c = state before chunk c, state <- gamma_c state + s_c. Reverse (the backward of
  the forward): chunks last to first; with hf (the forward's entering states) it also returns
  d gamma_c = <hin_c, hf_c> (here hin_c is the gradient w.r.t. the state leaving chunk c).
  """
  b, nc, h, pp, nn = s.shape
  bp = c.blocks.block_p
  npb = pp // bp
  # d gamma is accumulated as a vector in registers and stored once: padded to a power of two.
  ncp = _pow2_at_least(nc)
  state_spec = pl.BlockSpec((None, nc, None, bp, nn), lambda bi, hi, pb: (bi, 0, hi, pb, 0))
  one_spec = pl.BlockSpec((None, None, bp, nn), lambda bi, hi, pb: (bi, hi, pb, 0))
  gamma_spec = pl.BlockSpec((None, None, nc), lambda bi, hi, pb: (bi, hi, 0))
  names, in_specs, args = ["s", "gamma"], [state_spec, gamma_spec], [s, gamma]
  if init is not None:
    names.append("init"); in_specs.append(one_spec); args.append(init)
  if hf is not None:
    names.append("hf"); in_specs.append(state_spec); args.append(hf)
  names += ["hin", "final"]
  out_specs = [state_spec, one_spec]
  out_shape = [jax.ShapeDtypeStruct(s.shape, f32), jax.ShapeDtypeStruct((b, h, pp, nn), f32)]
  if hf is not None:
    names.append("dgamma")
    out_specs.append(pl.BlockSpec((None, None, None, ncp), lambda bi, hi, pb: (bi, hi, pb, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, npb, ncp), f32))
  outs = _gpu_call(functools.partial(_gpu_pass_kernel, c=c, names=names, reverse=reverse), c,
                   (b, h, npb), in_specs, out_specs, out_shape,
                   "altbench_ssd_state_pass" + ("_bwd" if reverse else ""), args)
  if hf is None:
    return outs[0], outs[1], None
  return outs[0], outs[1], outs[2][..., :nc].sum(2)


def _gpu_row_loops(i0, bm, bk, masked_all):
  """[(start, stop, masked)] over j tiles for output rows [i0, i0 + bm): tiles at or left of the
  diagonal only; the causal mask only where a tile crosses it (or everywhere, with documents)."""
  stop = _cdiv(i0 + bm, bk)
  if masked_all:
    return [(0, stop, True)]
  full = jnp.minimum(_idiv(i0 + 1, bk), stop)
  return [(0, full, False), (full, stop, True)]


def _gpu_col_loops(j0, bm, bk, nbi, masked_all):
  """[(start, stop, masked)] over i tiles for input rows [j0, j0 + bk)."""
  first = _idiv(j0, bm)
  if masked_all:
    return [(first, nbi, True)]
  clear = jnp.minimum(_cdiv(j0 + bk - 1, bm), nbi)
  return [(first, clear, True), (clear, nbi, False)]


def _gpu_keep(i_idx, j_idx, d_i, d_j, masked):
  if not masked:
    return None
  keep = i_idx >= j_idx
  if d_i is not None:
    keep = keep & (d_i == d_j)
  return keep


def _gpu_scan_fwd_kernel(*refs, c, names):
  rf = _refs(refs, names)
  bm, bk, q = c.blocks.block_m, c.blocks.block_k, c.q
  ib = lax.rem(pl.program_id(0), np.int32(q // bm))
  i0 = ib * bm
  rows = pl.ds(pl.multiple_of(i0, bm), bm)
  ci = rf["C"][...]
  dtype = rf["x"].dtype
  hi_i, lo_i = rf["hi"][rows][:, None], rf["lo"][rows][:, None]
  d_i = rf["doc"][rows][:, None] if c.has_doc else None
  i_idx = (i0 + jnp.arange(bm))[:, None]
  # Entering state: e_i * C_i . H (state cast to the operand dtype, as for every matmul).
  acc = rf["e"][...][:, None] * _dot(ci, rf["H"][...].astype(ci.dtype), "nt")

  def body(jb, acc, masked):
    js = pl.ds(pl.multiple_of(jb * bk, bk), bk)
    s = _dot(ci, rf["B"][js, :], "nt")
    keep = _gpu_keep(i_idx, (jb * bk + jnp.arange(bk))[None, :], d_i,
                     rf["doc"][js][None, :] if c.has_doc else None, masked)
    lm = _decay_tile(hi_i, lo_i, rf["hi"][js][None, :], rf["lo"][js][None, :], keep)
    m = s * lm * rf["dt"][js][None, :]
    return acc + _dot(m.astype(dtype), rf["x"][js, :])

  for lo, hi, masked in _gpu_row_loops(i0, bm, bk, c.has_doc):
    acc = _fori(lo, hi, functools.partial(body, masked=masked), acc)
  y = acc
  if c.has_D:
    y = y + rf["D"][...][None, :] * rf["x"][rows, :].astype(f32)
  if c.has_z:
    rf["u"][...] = y.astype(rf["u"].dtype)
    y = y * _silu_and_grad(rf["z"][...].astype(f32))[0]
  rf["out"][...] = y.astype(rf["out"].dtype)


def _gpu_scan_fwd(c, x, B, C, v, doc, H, D, z):
  b, lp, h, pp = x.shape
  nn = B.shape[-1]
  q, r, bm = c.q, c.r, c.blocks.block_m
  nbi = q // bm
  chunk = lambda i: _idiv(i, nbi)
  row = lambda w: pl.BlockSpec((None, bm, None, w), lambda i, bi, hi: (bi, i, hi, 0))
  vec = pl.BlockSpec((None, None, q), lambda i, bi, hi: (bi, hi, chunk(i)))
  names = ["C", "B", "x", "dt", "hi", "lo", "e"]
  in_specs = [pl.BlockSpec((None, bm, None, nn), lambda i, bi, hi: (bi, i, _idiv(hi, r), 0)),
              pl.BlockSpec((None, q, None, nn), lambda i, bi, hi: (bi, chunk(i), _idiv(hi, r), 0)),
              pl.BlockSpec((None, q, None, pp), lambda i, bi, hi: (bi, chunk(i), hi, 0)),
              vec, vec, vec, pl.BlockSpec((None, None, bm), lambda i, bi, hi: (bi, hi, i))]
  args = [C, B, x, v["dt"], v["hi"], v["lo"], v["e"]]
  if c.has_doc:
    names.append("doc")
    in_specs.append(pl.BlockSpec((None, q), lambda i, bi, hi: (bi, chunk(i))))
    args.append(doc)
  names.append("H")
  in_specs.append(pl.BlockSpec((None, None, None, pp, nn), lambda i, bi, hi: (bi, chunk(i), hi, 0, 0)))
  args.append(H)
  if c.has_D:
    names.append("D"); in_specs.append(pl.BlockSpec((None, pp), lambda i, bi, hi: (hi, 0))); args.append(D)
  if c.has_z:
    names.append("z"); in_specs.append(row(pp)); args.append(z)
  names.append("out")
  out_specs, out_shape = [row(pp)], [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  if c.has_z:
    names.append("u"); out_specs.append(row(pp)); out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  outs = _gpu_call(functools.partial(_gpu_scan_fwd_kernel, c=c, names=names), c, (c.nc * nbi, b, h),
                   in_specs, out_specs, out_shape, "altbench_ssd_chunk_scan", args)
  return outs[0], (outs[1] if c.has_z else None)


def _gpu_bwd_row_kernel(*refs, c, names):
  """Output rows i: dC_i (summed over this program's heads), the entering-state part of d cs_i, and
  this row tile's share of the intra-chunk d dA (see _intra_ddA)."""
  rf = _refs(refs, names)
  bm, bk, q, hp = c.blocks.block_m, c.blocks.block_k, c.q, c.blocks.heads
  nbj = q // bk
  ib = lax.rem(pl.program_id(0), np.int32(q // bm))
  i0 = ib * bm
  rows = pl.ds(pl.multiple_of(i0, bm), bm)
  ci = rf["C"][...]
  dtype = rf["x"].dtype
  d_i = rf["doc"][rows][:, None] if c.has_doc else None
  i_idx = (i0 + jnp.arange(bm))[:, None]

  def head(t, dC):
    du = rf["du"][:, t, :]
    hi_i, lo_i = rf["hi"][t, rows][:, None], rf["lo"][t, rows][:, None]
    e_i = rf["e"][t, rows]
    # Entering-state term y_i += e_i C_i . H: dC_i += e_i du_i H, d e_i = C_i . (du_i H).
    dho = _dot(du, rf["H"][t].astype(dtype))
    dC = dC + e_i[:, None] * dho
    rf["dhead"][t, :] = e_i * jnp.sum(ci.astype(f32) * dho, axis=1)

    def body(jb, carry, masked):
      dC, run = carry
      js = pl.ds(pl.multiple_of(jb * bk, bk), bk)
      bj = rf["B"][js, :]
      s = _dot(ci, bj, "nt")
      k_idx = (jb * bk + jnp.arange(bk))[None, :]
      keep = _gpu_keep(i_idx, k_idx, d_i, rf["doc"][js][None, :] if c.has_doc else None, masked)
      lm = _decay_tile(hi_i, lo_i, rf["hi"][t, js][None, :], rf["lo"][t, js][None, :], keep)
      dmp = _dot(du, rf["x"][js, t, :], "nt")                 # du_i . x_j
      dcb = dmp * lm * rf["dt"][t, js][None, :]               # d(C_i . B_j)
      gm = dcb * s                                            # d(cs_i - cs_j) of pair (i, j)
      # Inclusive prefix over j (all earlier tiles in `run`), summed over rows i > k.
      prefix = run[:, None] + jnp.cumsum(gm, axis=1)
      rf["tcs"][t, js] = jnp.sum(jnp.where(i_idx > k_idx, prefix, 0.0), axis=0)
      return dC + _dot(dcb.astype(dtype), bj), run + jnp.sum(gm, axis=1)

    carry = (dC, jnp.zeros((bm,), f32))
    for lo, hi, masked in _gpu_row_loops(i0, bm, bk, c.has_doc):
      carry = _fori(lo, hi, functools.partial(body, masked=masked), carry)

    def zero_fill(jb, carry):  # tiles right of the diagonal: no pair (i, j) with j <= i
      rf["tcs"][t, pl.ds(pl.multiple_of(jb * bk, bk), bk)] = jnp.zeros((bk,), f32)
      return carry

    _fori(_cdiv(i0 + bm, bk), nbj, zero_fill, jnp.int32(0))
    return carry[0]

  dC = jnp.zeros((bm, ci.shape[-1]), f32)
  dC = head(0, dC) if hp == 1 else lax.fori_loop(0, hp, head, dC)
  rf["dC"][...] = dC


def _gpu_bwd_col_kernel(*refs, c, names):
  """Input rows j: dx_j, d dt_j (intra and state parts), dB_j (summed over this program's heads)."""
  rf = _refs(refs, names)
  bm, bk, q, hp = c.blocks.block_m, c.blocks.block_k, c.q, c.blocks.heads
  nbi = q // bm
  jb = lax.rem(pl.program_id(0), np.int32(q // bk))
  j0 = jb * bk
  cols = pl.ds(pl.multiple_of(j0, bk), bk)
  bj = rf["B"][...]
  dtype = rf["x"].dtype
  d_j = rf["doc"][cols][None, :] if c.has_doc else None
  j_idx = (j0 + jnp.arange(bk))[None, :]

  def head(t, dB):
    xj = rf["x"][:, t, :]
    dt_j, l_j = rf["dt"][t, cols], rf["l"][t, cols]
    w_j = dt_j * l_j
    hi_j, lo_j = rf["hi"][t, cols][None, :], rf["lo"][t, cols][None, :]
    # Chunk-state term S = sum_j w_j x_j B_j^T with dS (the gradient w.r.t. the state leaving
    # the chunk): dx_j += w_j dS B_j, dB_j += w_j dS^T x_j, d w_j = x_j . (dS B_j).
    ds = rf["dS"][t].astype(dtype)
    bds = _dot(bj, ds, "nt")                                  # (bk, p)
    dB = dB + w_j[:, None] * _dot(xj, ds)
    ddt_state = l_j * jnp.sum(xj.astype(f32) * bds, axis=1)

    def body(ib, carry, masked):
      px, ddt, dB = carry
      is_ = pl.ds(pl.multiple_of(ib * bm, bm), bm)
      ci = rf["C"][is_, :]
      du = rf["du"][is_, t, :]
      s = _dot(ci, bj, "nt")                                  # (bm, bk)
      keep = _gpu_keep((ib * bm + jnp.arange(bm))[:, None], j_idx,
                       rf["doc"][is_][:, None] if c.has_doc else None, d_j, masked)
      lm = _decay_tile(rf["hi"][t, is_][:, None], rf["lo"][t, is_][:, None], hi_j, lo_j, keep)
      p = s * lm
      dmp = _dot(du, xj, "nt")                                # du_i . x_j
      px = px + _dot(p.astype(dtype), du, "tn")               # sum_i P_ij du_i
      ddt = ddt + jnp.sum(p * dmp, axis=0)
      dcb = dmp * lm * dt_j[None, :]
      return px, ddt, dB + _dot(dcb.astype(dtype), ci, "tn")

    carry = (jnp.zeros(xj.shape, f32), jnp.zeros((bk,), f32), dB)
    for lo, hi, masked in _gpu_col_loops(j0, bm, bk, nbi, c.has_doc):
      carry = _fori(lo, hi, functools.partial(body, masked=masked), carry)
    px, ddt_intra, dB = carry
    dx = dt_j[:, None] * px + w_j[:, None] * bds
    if c.has_D:
      dx = dx + rf["D"][t][None, :] * rf["du"][cols, t, :].astype(f32)
    rf["dx"][:, t, :] = dx.astype(rf["dx"].dtype)
    rf["ddt_intra"][t, :] = ddt_intra
    rf["ddt_state"][t, :] = ddt_state
    return dB

  dB = jnp.zeros((bk, bj.shape[-1]), f32)
  dB = head(0, dB) if hp == 1 else lax.fori_loop(0, hp, head, dB)
  rf["dB"][...] = dB


def _gpu_bwd(c, x, B, C, du, v, doc, H, dS, D):
  b, lp, h, pp = x.shape
  g, nn = B.shape[2], B.shape[-1]
  q, r = c.q, c.r
  bm, bk, hp = c.blocks.block_m, c.blocks.block_k, c.blocks.heads
  nhb = h // hp
  grp = lambda hb: _idiv(hb * hp, r)

  def common(chunk, vec_names):
    """Vector and document specs shared by the two kernels; chunk(i) is program i's chunk."""
    vec = pl.BlockSpec((None, hp, q), lambda i, bi, hb: (bi, hb, chunk(i)))
    names, specs, args = [], [], []
    for name in vec_names:
      names.append(name); specs.append(vec); args.append(v[name])
    if c.has_doc:
      names.append("doc")
      specs.append(pl.BlockSpec((None, q), lambda i, bi, hb: (bi, chunk(i))))
      args.append(doc)
    return names, specs, args

  # Row kernel: programs over (chunk x row tile of bm, batch, head block).
  nbi = q // bm
  chunk = lambda i: _idiv(i, nbi)
  names, specs, args = common(chunk, ["dt", "hi", "lo", "e"])
  names = ["C", "B", "x", "du"] + names + ["H", "dC", "dhead", "tcs"]
  specs = [pl.BlockSpec((None, bm, None, nn), lambda i, bi, hb: (bi, i, grp(hb), 0)),
           pl.BlockSpec((None, q, None, nn), lambda i, bi, hb: (bi, chunk(i), grp(hb), 0)),
           pl.BlockSpec((None, q, hp, pp), lambda i, bi, hb: (bi, chunk(i), hb, 0)),
           pl.BlockSpec((None, bm, hp, pp), lambda i, bi, hb: (bi, i, hb, 0))] + specs + [
               pl.BlockSpec((None, None, hp, pp, nn), lambda i, bi, hb: (bi, chunk(i), hb, 0, 0))]
  args = [C, B, x, du] + args + [H]
  dC_part, dhead, tcs = _gpu_call(
      functools.partial(_gpu_bwd_row_kernel, c=c, names=names), c, (c.nc * nbi, b, nhb), specs,
      [pl.BlockSpec((None, bm, None, nn), lambda i, bi, hb: (bi, i, hb, 0)),
       pl.BlockSpec((None, hp, bm), lambda i, bi, hb: (bi, hb, i)),
       pl.BlockSpec((None, hp, None, q), lambda i, bi, hb: (bi, hb, lax.rem(i, np.int32(nbi)), chunk(i)))],
      [jax.ShapeDtypeStruct((b, lp, nhb, nn), f32), jax.ShapeDtypeStruct((b, h, lp), f32),
       jax.ShapeDtypeStruct((b, h, nbi, lp), f32)],
      "altbench_ssd_bwd_rows", args)

  # Column kernel: programs over (chunk x column tile of bk, batch, head block).
  nbj = q // bk
  chunk = lambda j: _idiv(j, nbj)
  names, specs, args = common(chunk, ["dt", "hi", "lo", "l"])
  names = ["B", "C", "x", "du"] + names + ["dS"] + (["D"] if c.has_D else []) + [
      "dx", "dB", "ddt_intra", "ddt_state"]
  specs = [pl.BlockSpec((None, bk, None, nn), lambda j, bi, hb: (bi, j, grp(hb), 0)),
           pl.BlockSpec((None, q, None, nn), lambda j, bi, hb: (bi, chunk(j), grp(hb), 0)),
           pl.BlockSpec((None, bk, hp, pp), lambda j, bi, hb: (bi, j, hb, 0)),
           pl.BlockSpec((None, q, hp, pp), lambda j, bi, hb: (bi, chunk(j), hb, 0))] + specs + [
               pl.BlockSpec((None, None, hp, pp, nn), lambda j, bi, hb: (bi, chunk(j), hb, 0, 0))]
  args = [B, C, x, du] + args + [dS]
  if c.has_D:
    specs.append(pl.BlockSpec((hp, pp), lambda j, bi, hb: (hb, 0))); args.append(D)
  vec_out = pl.BlockSpec((None, hp, bk), lambda j, bi, hb: (bi, hb, j))
  dx, dB_part, ddt_intra, ddt_state = _gpu_call(
      functools.partial(_gpu_bwd_col_kernel, c=c, names=names), c, (c.nc * nbj, b, nhb), specs,
      [pl.BlockSpec((None, bk, hp, pp), lambda j, bi, hb: (bi, j, hb, 0)),
       pl.BlockSpec((None, bk, None, nn), lambda j, bi, hb: (bi, j, hb, 0)), vec_out, vec_out],
      [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, lp, nhb, nn), f32),
       jax.ShapeDtypeStruct((b, h, lp), f32), jax.ShapeDtypeStruct((b, h, lp), f32)],
      "altbench_ssd_bwd_cols", args)
  # Remaining partial sums over head blocks of one group.
  per_group = lambda a: a.reshape(b, lp, g, nhb // g, nn).sum(3)
  return dx, per_group(dB_part), per_group(dC_part), ddt_intra, ddt_state, dhead, tcs.sum(2)


# --------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels. Layouts: x, z, du (b, h, Lp, p); B, C (b, g, Lp, n); vectors
# (b, h, nc, 1, Q) lane rows; doc ids (b, nc, 1, Q); states (b, nc, h, p, n); p, n, Q multiples
# of 128. Column forms of vectors come from an aligned float32 transpose.


def _tpu_tile(x, width):
  """(rows, 128) -> (rows, width) for width a multiple of 128."""
  return x if width == _LANES else jnp.tile(x, (1, width // _LANES))


def _tpu_col(row, width):
  """(1, Q) row vector v -> (Q, width) matrix with [i, :] = v_i."""
  q = row.shape[-1]
  return _tpu_tile(jnp.broadcast_to(row.astype(f32), (_LANES, q)).T, width)


def _tpu_rowsum(m):
  """Row sums of a (R, K) float32 matrix as a (1, R) row (sublane reduction of the transpose)."""
  return jnp.sum(m.T, axis=0, keepdims=True)


def _tpu_intra_ddA(gm):
  """_intra_ddA's per-chunk sums T_k = sum_{i > k} sum_{j <= k} gm_ij on a whole (Q, Q) chunk.

  Mosaic has no cumsum: the prefix over j is a log-step (Hillis-Steele) scan of lane rotations.
  """
  from jax.experimental.pallas import tpu as pltpu
  q = gm.shape[-1]
  row = lax.broadcasted_iota(jnp.int32, gm.shape, 0)
  col = lax.broadcasted_iota(jnp.int32, gm.shape, 1)
  prefix, shift = gm, 1
  while shift < q:
    prefix = prefix + jnp.where(col >= shift, pltpu.roll(prefix, shift, 1), 0.0)
    shift *= 2
  return jnp.sum(jnp.where(row > col, prefix, 0.0), axis=0, keepdims=True)


def _tpu_dot_tn(a, b):
  """a.T @ b: a (float32) is transposed in float32 (as jax's own TPU kernels do), then cast to b's
  dtype for the matmul."""
  return _dot(a.astype(f32).T.astype(b.dtype), b)


def _tpu_decay(rf, has_doc):
  """(Q, Q) masked decay matrix of one chunk and head: rows i, columns j."""
  hi, lo = rf["hi"][...], rf["lo"][...]
  q = hi.shape[-1]
  keep = lax.broadcasted_iota(jnp.int32, (q, q), 0) >= lax.broadcasted_iota(jnp.int32, (q, q), 1)
  if has_doc:
    doc = rf["doc"][...].astype(f32)
    keep = keep & (_tpu_col(doc, q) == doc)
  return _decay_tile(_tpu_col(hi, q), _tpu_col(lo, q), hi, lo, keep)


def _tpu_interpret(c):
  return _tpu_interpret_params() if c.interpret is True else c.interpret


def _tpu_call(kernel, c, grid, in_specs, out_specs, out_shape, semantics, name, args, scratch=()):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=list(scratch), compiler_params=_tpu_params(semantics),
      interpret=_tpu_interpret(c), name=name)(*args)


def _tpu_outer_kernel(u_ref, v_ref, w_ref, o_ref):
  v = v_ref[...]
  wv = (v.astype(f32) * _tpu_col(w_ref[...], v.shape[-1])).astype(v.dtype)
  o_ref[...] = _tpu_dot_tn(u_ref[...], wv)  # (p, Q) @ (Q, n)


def _tpu_outer(c, u, v, w):
  """u (b, h, Lp, p), v (b, g, Lp, n), w (b, h, nc, 1, Q) -> (b, nc, h, p, n)."""
  b, h, lp, pp = u.shape
  nn = v.shape[-1]
  q, r = c.q, c.r
  return _tpu_call(
      _tpu_outer_kernel, c, (b, h, c.nc),
      [pl.BlockSpec((None, None, q, pp), lambda bi, hi, ci: (bi, hi, ci, 0)),
       pl.BlockSpec((None, None, q, nn), lambda bi, hi, ci: (bi, _idiv(hi, r), ci, 0)),
       pl.BlockSpec((None, None, None, 1, q), lambda bi, hi, ci: (bi, hi, ci, 0, 0))],
      pl.BlockSpec((None, None, None, pp, nn), lambda bi, hi, ci: (bi, ci, hi, 0, 0)),
      jax.ShapeDtypeStruct((b, c.nc, h, pp, nn), f32), ("parallel", "parallel", "parallel"),
      "altbench_ssd_chunk_outer_tpu", (u, v, w))


def _tpu_pass_kernel(*refs, c, names):
  rf = _refs(refs, names)
  k = pl.program_id(2)

  @pl.when(k == 0)
  def _():
    rf["st"][...] = rf["init"][...] if "init" in rf else jnp.zeros(rf["st"].shape, f32)

  state = rf["st"][...]
  rf["hin"][...] = state
  if "hf" in rf:
    dg = jnp.sum(jnp.sum(state * rf["hf"][...], axis=0, keepdims=True), axis=1, keepdims=True)
    rf["dgamma"][...] = jnp.broadcast_to(dg, rf["dgamma"].shape)
  new = rf["gamma"][...] * state + rf["s"][...]
  rf["st"][...] = new

  @pl.when(k == c.nc - 1)
  def _():
    rf["final"][...] = new


def _tpu_pass(c, s, gamma, init, reverse=False, hf=None):
  b, nc, h, pp, nn = s.shape
  ci = (lambda k: nc - 1 - k) if reverse else (lambda k: k)
  state_spec = pl.BlockSpec((None, None, None, pp, nn), lambda bi, hi, k: (bi, ci(k), hi, 0, 0))
  one_spec = pl.BlockSpec((None, None, pp, nn), lambda bi, hi, k: (bi, hi, 0, 0))
  gamma_rows = jnp.broadcast_to(gamma[..., None, None], (b, h, nc, 1, nn))
  names = ["s", "gamma"]
  in_specs = [state_spec, pl.BlockSpec((None, None, None, 1, nn), lambda bi, hi, k: (bi, hi, ci(k), 0, 0))]
  args = [s, gamma_rows]
  if init is not None:
    names.append("init"); in_specs.append(one_spec); args.append(init)
  if hf is not None:
    names.append("hf"); in_specs.append(state_spec); args.append(hf)
  names += ["hin", "final"]
  out_specs = [state_spec, one_spec]
  out_shape = [jax.ShapeDtypeStruct(s.shape, f32), jax.ShapeDtypeStruct((b, h, pp, nn), f32)]
  if hf is not None:
    names.append("dgamma")
    out_specs.append(pl.BlockSpec((None, None, None, 1, _LANES), lambda bi, hi, k: (bi, hi, ci(k), 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, nc, 1, _LANES), f32))
  names.append("st")
  outs = _tpu_call(functools.partial(_tpu_pass_kernel, c=c, names=names), c, (b, h, nc), in_specs,
                   out_specs, out_shape, ("parallel", "parallel", "arbitrary"),
                   "altbench_ssd_state_pass_tpu" + ("_bwd" if reverse else ""), args,
                   [_tpu_vmem((pp, nn), f32)])
  return outs[0], outs[1], (outs[2][..., 0, 0] if hf is not None else None)


def _tpu_specs(c, pp, nn):
  """BlockSpecs over grid (b, nc, g, r) for the scan and backward kernels."""
  q, r = c.q, c.r
  head = lambda gi, ri: gi * r + ri
  group_tile = pl.BlockSpec((None, None, q, nn), lambda bi, ci, gi, ri: (bi, gi, ci, 0))
  head_tile = pl.BlockSpec((None, None, q, pp), lambda bi, ci, gi, ri: (bi, head(gi, ri), ci, 0))
  vec = pl.BlockSpec((None, None, None, 1, q), lambda bi, ci, gi, ri: (bi, head(gi, ri), ci, 0, 0))
  doc = pl.BlockSpec((None, None, 1, q), lambda bi, ci, gi, ri: (bi, ci, 0, 0))
  state = pl.BlockSpec((None, None, None, pp, nn), lambda bi, ci, gi, ri: (bi, ci, head(gi, ri), 0, 0))
  dvec = pl.BlockSpec((None, 1, pp), lambda bi, ci, gi, ri: (head(gi, ri), 0, 0))
  return dict(group_tile=group_tile, head_tile=head_tile, vec=vec, doc=doc, state=state, D=dvec)


def _tpu_scan_fwd_kernel(*refs, c, names):
  rf = _refs(refs, names)

  @pl.when(pl.program_id(3) == 0)  # C B^T is shared by the heads of a group
  def _():
    rf["cb"][...] = _dot(rf["C"][...], rf["B"][...], "nt")

  x = rf["x"][...]
  cmat = rf["C"][...]
  pp = x.shape[-1]
  m = rf["cb"][...] * _tpu_decay(rf, c.has_doc) * rf["dt"][...]
  y = _dot(m.astype(x.dtype), x)
  y = y + _tpu_col(rf["e"][...], pp) * _dot(cmat, rf["H"][...].astype(cmat.dtype), "nt")
  if c.has_D:
    y = y + rf["D"][...] * x.astype(f32)
  if c.has_z:
    rf["u"][...] = y.astype(rf["u"].dtype)
    y = y * _silu_and_grad(rf["z"][...].astype(f32))[0]
  rf["out"][...] = y.astype(rf["out"].dtype)


def _tpu_scan_fwd(c, x, B, C, v, doc, H, D, z):
  b, h, lp, pp = x.shape
  g, nn = B.shape[1], B.shape[-1]
  sp = _tpu_specs(c, pp, nn)
  names = ["C", "B", "x", "dt", "hi", "lo", "e"]
  in_specs = [sp["group_tile"], sp["group_tile"], sp["head_tile"], sp["vec"], sp["vec"], sp["vec"], sp["vec"]]
  args = [C, B, x, v["dt"], v["hi"], v["lo"], v["e"]]
  if c.has_doc:
    names.append("doc"); in_specs.append(sp["doc"]); args.append(doc)
  names.append("H"); in_specs.append(sp["state"]); args.append(H)
  if c.has_D:
    names.append("D"); in_specs.append(sp["D"]); args.append(D)
  if c.has_z:
    names.append("z"); in_specs.append(sp["head_tile"]); args.append(z)
  names.append("out")
  out_specs, out_shape = [sp["head_tile"]], [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  if c.has_z:
    names.append("u")
    out_specs.append(sp["head_tile"])
    out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
  names.append("cb")
  outs = _tpu_call(functools.partial(_tpu_scan_fwd_kernel, c=c, names=names), c, (b, c.nc, g, c.r),
                   in_specs, out_specs, out_shape, ("parallel", "parallel", "parallel", "arbitrary"),
                   "altbench_ssd_chunk_scan_tpu", args, [_tpu_vmem((c.q, c.q), f32)])
  return outs[0], (outs[1] if c.has_z else None)


def _tpu_bwd_kernel(*refs, c, names):
  rf = _refs(refs, names)
  ri = pl.program_id(3)
  cmat, bmat = rf["C"][...], rf["B"][...]

  @pl.when(ri == 0)
  def _():
    rf["cb"][...] = _dot(cmat, bmat, "nt")
    rf["dB_acc"][...] = jnp.zeros(rf["dB_acc"].shape, f32)
    rf["dC_acc"][...] = jnp.zeros(rf["dC_acc"].shape, f32)

  x, du = rf["x"][...], rf["du"][...]
  dtype = x.dtype
  pp, nn = x.shape[-1], bmat.shape[-1]
  dt, l, e = rf["dt"][...], rf["l"][...], rf["e"][...]
  cb = rf["cb"][...]
  lm = _tpu_decay(rf, c.has_doc)
  p = cb * lm
  dmp = _dot(du, x, "nt")                                     # [i, j] = du_i . x_j
  px = _tpu_dot_tn(p, du)                                     # [j] = sum_i P_ij du_i
  ddt_intra = jnp.sum(p * dmp, axis=0, keepdims=True)
  dcb = dmp * lm * dt
  rf["tcs"][...] = _tpu_intra_ddA(dcb * cb)
  dC = _dot(dcb.astype(dtype), bmat)
  dB = _tpu_dot_tn(dcb, cmat)
  # Chunk-state term (see the GPU column kernel).
  ds = rf["dS"][...].astype(dtype)
  bds = _dot(bmat, ds, "nt")                                  # (Q, p)
  w = dt * l
  dB = dB + _tpu_col(w, nn) * _dot(x, ds)
  ddt_state = l * _tpu_rowsum(x.astype(f32) * bds)
  dx = _tpu_col(dt, pp) * px + _tpu_col(w, pp) * bds
  if c.has_D:
    dx = dx + rf["D"][...] * du.astype(f32)
  # Entering-state term (see the GPU row kernel).
  dho = _dot(du, rf["H"][...].astype(dtype))                  # (Q, n)
  dC = dC + _tpu_col(e, nn) * dho
  dhead = e * _tpu_rowsum(cmat.astype(f32) * dho)
  rf["dx"][...] = dx.astype(rf["dx"].dtype)
  rf["ddt_intra"][...] = ddt_intra
  rf["ddt_state"][...] = ddt_state
  rf["dhead"][...] = dhead
  rf["dB_acc"][...] += dB
  rf["dC_acc"][...] += dC

  @pl.when(ri == c.r - 1)
  def _():
    rf["dB"][...] = rf["dB_acc"][...]
    rf["dC"][...] = rf["dC_acc"][...]


def _tpu_bwd(c, x, B, C, du, v, doc, H, dS, D):
  b, h, lp, pp = x.shape
  g, nn = B.shape[1], B.shape[-1]
  q = c.q
  sp = _tpu_specs(c, pp, nn)
  names = ["C", "B", "x", "du", "dt", "hi", "lo", "e", "l"]
  in_specs = [sp["group_tile"], sp["group_tile"], sp["head_tile"], sp["head_tile"]] + [sp["vec"]] * 5
  args = [C, B, x, du, v["dt"], v["hi"], v["lo"], v["e"], v["l"]]
  if c.has_doc:
    names.append("doc"); in_specs.append(sp["doc"]); args.append(doc)
  names += ["H", "dS"]; in_specs += [sp["state"], sp["state"]]; args += [H, dS]
  if c.has_D:
    names.append("D"); in_specs.append(sp["D"]); args.append(D)
  names += ["dx", "dB", "dC", "ddt_intra", "ddt_state", "dhead", "tcs", "cb", "dB_acc", "dC_acc"]
  vec_shape = jax.ShapeDtypeStruct((b, h, c.nc, 1, q), f32)
  outs = _tpu_call(
      functools.partial(_tpu_bwd_kernel, c=c, names=names), c, (b, c.nc, g, c.r), in_specs,
      [sp["head_tile"], sp["group_tile"], sp["group_tile"]] + [sp["vec"]] * 4,
      [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, g, lp, nn), f32),
       jax.ShapeDtypeStruct((b, g, lp, nn), f32)] + [vec_shape] * 4,
      ("parallel", "parallel", "parallel", "arbitrary"), "altbench_ssd_bwd_tpu", args,
      [_tpu_vmem((q, q), f32), _tpu_vmem((q, nn), f32), _tpu_vmem((q, nn), f32)])
  return outs


class _TpuOps:
  """The TPU kernels behind the canonical (GPU-layout) interface of the glue code."""

  @staticmethod
  def _heads(a):   # (b, Lp, h, w) <-> (b, h, Lp, w)
    return jnp.swapaxes(a, 1, 2)

  @staticmethod
  def _rows(c, a):  # (b, h, Lp) -> (b, h, nc, 1, Q)
    return a.reshape(a.shape[0], a.shape[1], c.nc, 1, c.q)

  @staticmethod
  def outer(c, u, v, w):
    return _tpu_outer(c, _TpuOps._heads(u), _TpuOps._heads(v), _TpuOps._rows(c, w))

  pass_ = staticmethod(_tpu_pass)

  @staticmethod
  def scan_fwd(c, x, B, C, v, doc, H, D, z):
    t, rows = _TpuOps._heads, functools.partial(_TpuOps._rows, c)
    vr = {k: rows(v[k]) for k in ("dt", "hi", "lo", "e")}
    doc_r = None if doc is None else doc.reshape(doc.shape[0], c.nc, 1, c.q)
    D_r = None if D is None else D[:, None, :]
    out, u = _tpu_scan_fwd(c, t(x), t(B), t(C), vr, doc_r, H, D_r, None if z is None else t(z))
    return t(out), (None if u is None else t(u))

  @staticmethod
  def bwd(c, x, B, C, du, v, doc, H, dS, D):
    t, rows = _TpuOps._heads, functools.partial(_TpuOps._rows, c)
    vr = {k: rows(v[k]) for k in ("dt", "hi", "lo", "e", "l")}
    doc_r = None if doc is None else doc.reshape(doc.shape[0], c.nc, 1, c.q)
    D_r = None if D is None else D[:, None, :]
    dx, dB, dC, *vecs = _tpu_bwd(c, t(x), t(B), t(C), t(du), vr, doc_r, H, dS, D_r)
    flat = lambda a: a.reshape(a.shape[0], a.shape[1], -1)
    return (t(dx), t(dB), t(dC), *map(flat, vecs))


class _GpuOps:
  outer = staticmethod(_gpu_outer)
  pass_ = staticmethod(_gpu_pass)
  scan_fwd = staticmethod(_gpu_scan_fwd)
  bwd = staticmethod(_gpu_bwd)


def _ops(c):
  return _GpuOps if c.target == "gpu" else _TpuOps


# --------------------------------------------------------------------------------------------
# custom_vjp over the core (inputs padded, dt processed)


def _core_fwd_impl(c, x, dt, A, B, C, D, z, h0, doc):
  ops = _ops(c)
  v = _vectors(dt, A, doc, c.q)
  S = ops.outer(c, x, B, v["dt"] * v["l"])
  H, final, _ = ops.pass_(c, S, v["gamma"], h0)
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
  ops = _ops(c)
  v = _vectors(dt, A, doc, c.q)
  dout = dout.astype(f32)
  dz = None
  if c.has_z:
    silu, dsilu = _silu_and_grad(z.astype(f32))
    dz = (dout * u.astype(f32) * dsilu).astype(z.dtype)
    dout = dout * silu
  dD = jnp.einsum("blhp,blhp->hp", dout, x.astype(f32)) if c.has_D else None
  du = dout.astype(x.dtype)
  G = ops.outer(c, du, C, v["e"])
  dS, dh0, dgamma = ops.pass_(c, G, v["gamma"], dfinal.astype(f32), reverse=True, hf=H)
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
    pp, nn = max(16, _pow2_at_least(p)), max(16, _pow2_at_least(n))
  else:
    pp, nn = _round_up(p, _LANES), _round_up(n, _LANES)
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
