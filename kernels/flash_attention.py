"""Flash attention as Pallas kernels (forward and backward) for GPU (Triton) and TPU (Mosaic).

``flash_attention(q, k, v, causal=..., segment_ids=..., softmax_scale=...)`` computes the same thing
as ``kernels.attention``'s reference, softmax(q k^T * scale + mask) v with grouped KV heads, without
ever materialising the (T, S) score matrix: each program keeps one tile of queries and streams the
keys and values past it, keeping a running max and sum (online softmax, FlashAttention-2). It is
differentiable through ``jax.custom_vjp``; the forward saves only the output and the per-row
log-sum-exp (as its two parts, see Numerics), and the backward recomputes the probabilities tile by
tile.

Two targets, chosen from ``jax.default_backend()`` (or ``target=``):

* ``"gpu"``: Pallas on the Triton backend. Triton rather than Mosaic GPU because it runs on every
  NVIDIA GPU from Ampere (sm80) on, not just Hopper/Blackwell, it is what jax's own
  ``jax.experimental.pallas.ops.gpu.attention`` is written in, and its programs are plain
  "one tile, loop over the rest" code that is easy to keep correct. Mosaic GPU (warp-specialised,
  TMA, wgmma) can go faster on H100 but is Hopper-only and far more intricate.
  Layout (b, L, h, d), untouched. Forward and dq: grid (q blocks, b, h), each program loops over
  kv blocks with ``lax.fori_loop``; for causal attention the loop stops at the diagonal block (the
  fully-masked blocks are never visited) and the q blocks are issued longest-first. dk/dv: grid
  (kv blocks, b, kv heads), each program loops over the q heads of its group and the q blocks at
  or below the diagonal, so grouped KV heads are reduced inside the kernel (no repeat of k/v and
  no per-q-head dk/dv). K/V of the forward and dq kernels are indexed at head ``h // groups``.
* ``"tpu"``: Pallas TPU (Mosaic). Layout (b, h, L, d) (transposed in the wrapper) so that blocks
  are (rows, head_dim) tiles in the (8, 128) layout. Forward and dq: grid (b, h, q blocks, kv
  blocks) with the kv dimension "arbitrary" (sequential, accumulating into VMEM scratch) and the
  others "parallel"; dk/dv: grid (b, kv heads, kv blocks, groups * q blocks). Causally
  fully-masked blocks are skipped with ``pl.when`` and their index maps are clamped to the last
  needed block so that no DMA is issued for them. Per-row statistics (max, sum, delta) and
  q segment ids are stored replicated across 128 lanes and kv segment ids across 8 sublanes, as
  jax's own TPU flash attention does, so the kernel never needs a 1-D vector or a transpose of one.

Backward strategy (both targets): FlashAttention-2's, two separate kernels. ``delta = rowsum(o * do)``
is computed by XLA (one fused elementwise-reduce), then a dk/dv kernel parallel over kv blocks and a
dq kernel parallel over q blocks; no atomics, each output written once.

Numerics. Products run on the matrix units in the input dtype with float32 accumulation (float32
inputs use ``Precision.HIGHEST``, i.e. no TF32); softmax statistics are float32 and kept in base 2
(scores are multiplied by scale * log2(e) and exponentiated with exp2, which is cheaper than exp on
GPUs). The residual is the base-2 log-sum-exp kept as its two terms, row max m and log2(row sum),
and the backward forms p = exp2((s - m) - log2 l): for a row that sees no key m is the mask value
(~-2.4e38) and m + log2 l would round back to m, losing the 1/l of its uniform average (its dv would
come out l times too large). Masked scores get the same large finite value as the reference (-0.7 *
float32 max), so a query row that sees no key gets the uniform average over the keys the kernel
visits; padding keys get float32 min so they never enter that average. The one
divergence from the reference: a row with no visible key under ``causal=True`` (possible only with
``segment_ids=(q_ids, kv_ids)``) averages over keys up to its diagonal block, the reference over
all keys. Gradients at masked positions are zero, as in the reference.

Lengths that are not block multiples are padded (zeros) up to the block size and sliced back; pad
keys are masked, pad query rows get a row max of +float32 max in the backward so they contribute
exactly nothing. A head_dim that Triton cannot tile (not a power of two, or < 16) is zero-padded too.

A dense boolean ``mask`` is not supported here (``kernels.attention`` falls back to XLA for it).
On CPU (or with ``interpret=True``) the kernels run in Pallas interpret mode: slow, for tests only.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from altbench.kernels import tuning

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # same as kernels.attention
_PAD_VALUE = float(np.finfo(np.float32).min)           # below _MASK_VALUE: pad keys never count
_BIG = float(np.finfo(np.float32).max)                 # m of pad query rows: exp2(s - _BIG) == 0
_LOG2E = math.log2(math.e)
_LANES, _SUBLANES = 128, 8
TARGETS = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: forward (q, kv), dk/dv kernel (q, kv), dq kernel (q, kv); Triton warps and stages."""
  block_q: int
  block_k: int
  block_q_dkv: int
  block_k_dkv: int
  block_q_dq: int
  block_k_dq: int
  num_warps: int = 4
  num_stages: int = 2


# Block sizes per (target, head_dim class): the class is the smallest of 64, 128, 256 that holds
# head_dim. They are clamped to the (padded) sequence lengths at call time. None of them has been
# tuned on hardware yet (no GPU/TPU when this was written); they follow the usual shapes:
# * GPU (Triton, sm80/sm90): the forward and dq kernels keep a (block_q, d) float32 accumulator in
#   registers, the dk/dv kernel two (block_k, d) ones, so the accumulated dimension shrinks as d
#   grows; the streamed dimension stays small in the backward (it holds two score-sized tiles).
#   8 warps from head_dim 128 up, 4 below; warps and stages are shared by the three kernels.
# * TPU: multiples of 128 along kv (lane dimension) and of 8/16 along q; large tiles amortise the
#   per-grid-step overhead (~0.35 us) and keep the MXU fed, bounded by ~16-32 MiB of scoped VMEM.
_BLOCKS = {
    ("gpu", 64): BlockSizes(128, 64, 32, 128, 128, 32, num_warps=4, num_stages=3),
    ("gpu", 128): BlockSizes(128, 64, 32, 64, 64, 32, num_warps=8, num_stages=2),
    ("gpu", 256): BlockSizes(64, 32, 16, 32, 32, 16, num_warps=8, num_stages=2),
    ("tpu", 64): BlockSizes(512, 512, 256, 512, 512, 256),
    ("tpu", 128): BlockSizes(512, 512, 256, 512, 512, 256),
    ("tpu", 256): BlockSizes(256, 256, 128, 256, 256, 128),
}
MAX_HEAD_DIM = 256


def head_dim_class(d):
  return next(c for c in (64, 128, 256) if d <= c)


def default_block_sizes(target, head_dim):
  """The tuned entry for this device kind (kernels/tuning.py) if there is one, else the table above."""
  tuned = tuning.lookup("flash_attention", f"d{head_dim_class(head_dim)}")
  return BlockSizes(**tuned) if tuned else _BLOCKS[(target, head_dim_class(head_dim))]


def supported(q_shape, k_shape, *, mask=None):
  """Whether flash_attention handles this call (kernels.attention's auto dispatch asks)."""
  return mask is None and q_shape[-1] <= MAX_HEAD_DIM


def backend_target(backend=None):
  """"gpu" / "tpu" for a backend with Pallas kernels, else None (e.g. "cpu")."""
  backend = backend or jax.default_backend()
  return backend if backend in TARGETS else None


# --------------------------------------------------------------------------------------------
# API-name compatibility (jax 0.10 / 0.11 and a little older)


def _triton_params(num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def _tpu_params(semantics):
  from jax.experimental.pallas import tpu as pltpu
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=semantics)


def _tpu_vmem(shape, dtype):
  from jax.experimental.pallas import tpu as pltpu
  space = getattr(pltpu, "VMEM", None) or pltpu.MemorySpace.VMEM  # pltpu.TPUMemorySpace on old jax
  return space(shape, dtype)


def _tpu_interpret_params():
  """What to pass as interpret= to run the TPU kernels on CPU (simulated TPU memory if available)."""
  from jax.experimental.pallas import tpu as pltpu
  cls = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams", None)
  return cls() if cls is not None else True


# --------------------------------------------------------------------------------------------
# Shared pieces


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static description of one call, on padded arrays (hashable: a custom_vjp nondiff argument)."""
  causal: bool
  scale: float
  q_len: int        # real (unpadded) lengths
  kv_len: int
  has_seg: bool
  blocks: BlockSizes
  interpret: object  # False, True, or a pltpu.InterpretParams


def _dot(a, b, trans_b=False):
  """a @ b (or a @ b.T) with float32 accumulation; float32 operands are not rounded to TF32/bf16."""
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  # Explicit either way, so a global default_matmul_precision cannot turn bf16 tiles into fp32 passes.
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _mask_scores(s, row, col, q_ids, kv_ids, *, causal, kv_len=None):
  """Mask scores; returns (masked scores, visibility or None). row/col/ids broadcast to s.

  kv_len: mask columns >= kv_len (padding) with _PAD_VALUE, which stays out of even a fully-masked
  row's uniform average. Visibility (causal, segments) is returned for zeroing ds.
  """
  visible = None
  if causal:
    visible = row >= col
  if q_ids is not None:
    same = q_ids == kv_ids
    visible = same if visible is None else visible & same
  if visible is not None:
    s = jnp.where(visible, s, _MASK_VALUE)
  if kv_len is not None:
    s = jnp.where(col < kv_len, s, _PAD_VALUE)
  return s, visible


def _idiv(a, b):
  # Truncating integer division of non-negative values; lax.div keeps both Triton and Mosaic
  # lowerings simple (jnp's floor division adds sign fix-ups), and a numpy scalar stays a literal
  # (pallas_call rejects captured constants).
  return lax.div(a, np.int32(b))


def _cdiv(a, b):
  return _idiv(a + (b - 1), b)


def _fori(lo, hi, body, carry):
  # A loop with static bounds becomes a scan; skip statically empty ones rather than lowering a
  # zero-trip loop.
  if isinstance(lo, int) and isinstance(hi, int) and lo >= hi:
    return carry
  return lax.fori_loop(lo, hi, body, carry)


# --------------------------------------------------------------------------------------------
# GPU (Triton) kernels. Refs are (rows, d) tiles of the (b, L, h, d) arrays.


def _gpu_q_block(pid, nq, causal):
  # Causal programs differ in work (row i visits i / block_k kv blocks): issue the longest first
  # so the short ones fill in the tail of the launch.
  return nq - 1 - pid if causal else pid


def _gpu_kv_loops(qi, bq, bk, nk, c):
  """[(start, stop, masked)] over kv blocks for q block qi: visible blocks only, masks where needed."""
  if c.causal:
    stop = jnp.minimum(_cdiv((qi + 1) * bq, bk), nk)  # past the diagonal block: all masked, skipped
    if c.has_seg:
      return [(0, stop, True)]
    full = jnp.minimum(_idiv(qi * bq, bk), stop)        # blocks entirely left of the diagonal
    return [(0, full, False), (full, stop, True)]
  if c.has_seg:
    return [(0, nk, True)]
  # The kv length is padded to the largest of the fwd / dq / dkv tiles, so with a smaller tile here
  # more than the last block can hold pad keys: mask from the first of them, skip blocks of pads only.
  full, stop = c.kv_len // bk, min(-(-c.kv_len // bk), nk)
  return [(0, full, False)] + ([(full, stop, True)] if stop > full else [])


def _gpu_fwd_kernel(*refs, c, nq, nk):
  if c.has_seg:
    q_ref, k_ref, v_ref, qid_ref, kid_ref, o_ref, m_ref, ll_ref = refs
  else:
    (q_ref, k_ref, v_ref, o_ref, m_ref, ll_ref), qid_ref, kid_ref = refs, None, None
  bq, bk = c.blocks.block_q, c.blocks.block_k
  qi = _gpu_q_block(pl.program_id(0), nq, c.causal)
  q = q_ref[...]
  row = (qi * bq + jnp.arange(bq))[:, None]
  q_ids = qid_ref[...][:, None] if c.has_seg else None
  pad_len = None if c.causal or nk * bk == c.kv_len else c.kv_len  # causal already hides pad keys
  s_scale = c.scale * _LOG2E

  def body(kj, carry, masked):
    acc, m, l = carry
    ks = pl.ds(pl.multiple_of(kj * bk, bk), bk)
    s = _dot(q, k_ref[ks, :], trans_b=True) * s_scale
    if masked:
      col = (kj * bk + jnp.arange(bk))[None, :]
      kv_ids = kid_ref[ks][None, :] if c.has_seg else None
      s, _ = _mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal, kv_len=pad_len)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    v = v_ref[ks, :]
    return acc * alpha[:, None] + _dot(p.astype(v.dtype), v), m_new, l * alpha + jnp.sum(p, axis=1)

  carry = (jnp.zeros((bq, q.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  for lo, hi, masked in _gpu_kv_loops(qi, bq, bk, nk, c):
    carry = _fori(lo, hi, functools.partial(body, masked=masked), carry)
  acc, m, l = carry
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)  # l >= 1: the row max contributes exp2(0)
  m_ref[...] = m
  ll_ref[...] = jnp.log2(l)


def _gpu_dq_kernel(*refs, c, nq, nk):
  if c.has_seg:
    q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, qid_ref, kid_ref, dq_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, dq_ref), qid_ref, kid_ref = refs, None, None
  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  qi = _gpu_q_block(pl.program_id(0), nq, c.causal)
  q, do = q_ref[...], do_ref[...]
  m, ll, delta = m_ref[...][:, None], ll_ref[...][:, None], delta_ref[...][:, None]
  row = (qi * bq + jnp.arange(bq))[:, None]
  q_ids = qid_ref[...][:, None] if c.has_seg else None
  pad_len = None if c.causal or nk * bk == c.kv_len else c.kv_len
  s_scale = c.scale * _LOG2E

  def body(kj, dq, masked):
    ks = pl.ds(pl.multiple_of(kj * bk, bk), bk)
    k, v = k_ref[ks, :], v_ref[ks, :]
    s = _dot(q, k, trans_b=True) * s_scale
    visible = None
    if masked:
      col = (kj * bk + jnp.arange(bk))[None, :]
      kv_ids = kid_ref[ks][None, :] if c.has_seg else None
      s, visible = _mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal, kv_len=pad_len)
    p = jnp.exp2(s - m - ll)
    ds = p * (_dot(do, v, trans_b=True) - delta)
    if visible is not None:  # a fully-masked row has p > 0 at masked keys; its logits get no grad
      ds = jnp.where(visible, ds, 0.0)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros((bq, q.shape[-1]), jnp.float32)
  for lo, hi, masked in _gpu_kv_loops(qi, bq, bk, nk, c):
    dq = _fori(lo, hi, functools.partial(body, masked=masked), dq)
  dq_ref[...] = (dq * c.scale).astype(dq_ref.dtype)


def _gpu_dkdv_kernel(*refs, c, nq, groups):
  # q/do refs are (T, groups, d) (all q heads of this kv head), m/ll/delta (groups, T).
  if c.has_seg:
    q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, qid_ref, kid_ref, dk_ref, dv_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, dk_ref, dv_ref) = refs
    qid_ref = kid_ref = None
  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  kj = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  col = (kj * bk + jnp.arange(bk))[None, :]
  kv_ids = kid_ref[...][None, :] if c.has_seg else None
  s_scale = c.scale * _LOG2E
  # Pad keys need no mask here: a key column only feeds its own dk/dv rows, which are sliced off.
  if c.causal:
    first = _idiv(kj * bk, bq)                                 # earlier q blocks see none of it
    clear = jnp.minimum(_cdiv((kj + 1) * bk - 1, bq), nq)      # from here on all rows see all keys
    loops = [(first, nq, True)] if c.has_seg else [(first, clear, True), (clear, nq, False)]
  else:
    loops = [(0, nq, c.has_seg)]

  def body(qi, carry, j, masked):
    dk, dv = carry
    qs = pl.ds(pl.multiple_of(qi * bq, bq), bq)
    q, do = q_ref[qs, j, :], do_ref[qs, j, :]
    s = _dot(q, k, trans_b=True) * s_scale
    visible = None
    if masked:
      row = (qi * bq + jnp.arange(bq))[:, None]
      q_ids = qid_ref[qs][:, None] if c.has_seg else None
      s, visible = _mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal)
    p = jnp.exp2(s - m_ref[j, qs][:, None] - ll_ref[j, qs][:, None])
    dv = dv + _dot(p.astype(do.dtype).T, do)
    ds = p * (_dot(do, v, trans_b=True) - delta_ref[j, qs][:, None])
    if visible is not None:
      ds = jnp.where(visible, ds, 0.0)
    return dk + _dot(ds.astype(q.dtype).T, q), dv

  def per_head(j, carry):
    for lo, hi, masked in loops:
      carry = _fori(lo, hi, functools.partial(body, j=j, masked=masked), carry)
    return carry

  zeros = jnp.zeros((bk, k.shape[-1]), jnp.float32)
  carry = (zeros, zeros)
  dk, dv = per_head(0, carry) if groups == 1 else lax.fori_loop(0, groups, per_head, carry)
  dk_ref[...] = (dk * c.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_fwd(q, k, v, q_ids, kv_ids, c):
  b, tp, h, d = q.shape
  sp, hk = k.shape[1], k.shape[2]
  g, bq, bk = h // hk, c.blocks.block_q, c.blocks.block_k
  nq, nk = tp // bq, sp // bk
  qb = lambda i: _gpu_q_block(i, nq, c.causal)
  in_specs = [pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qb(i), hi, 0)),
              pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, _idiv(hi, g), 0)),
              pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, _idiv(hi, g), 0))]
  args = [q, k, v]
  if c.has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, qb(i))),
                 pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0))]
    args += [q_ids, kv_ids]
  return pl.pallas_call(
      functools.partial(_gpu_fwd_kernel, c=c, nq=nq, nk=nk),
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qb(i), hi, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qb(i))),
                 pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qb(i)))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      compiler_params=_triton_params(c.blocks.num_warps, c.blocks.num_stages),
      interpret=c.interpret,
      name="altbench_flash_fwd",
  )(*args)


def _gpu_bwd(q, k, v, q_ids, kv_ids, m, ll, delta, do, c):
  b, tp, h, d = q.shape
  sp, hk = k.shape[1], k.shape[2]
  g = h // hk
  params = _triton_params(c.blocks.num_warps, c.blocks.num_stages)
  seg = [q_ids, kv_ids] if c.has_seg else []

  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  nq, nk = tp // bq, sp // bk
  qb = lambda i: _gpu_q_block(i, nq, c.causal)
  q_tile = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qb(i), hi, 0))
  kv_all = pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, _idiv(hi, g), 0))
  row_tile = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qb(i)))
  seg_specs = [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, qb(i))),
               pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0))] if c.has_seg else []
  dq = pl.pallas_call(
      functools.partial(_gpu_dq_kernel, c=c, nq=nq, nk=nk),
      grid=(nq, b, h),
      in_specs=[q_tile, kv_all, kv_all, q_tile, row_tile, row_tile, row_tile, *seg_specs],
      out_specs=q_tile,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=c.interpret, name="altbench_flash_dq",
  )(q, k, v, do, m, ll, delta, *seg)

  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  nq, nk = tp // bq, sp // bk
  # All q heads of one kv head in one block: (b, T, hk, g, d), free reshapes of contiguous arrays.
  q_grp = pl.BlockSpec((None, tp, None, g, d), lambda kj, bi, kh: (bi, 0, kh, 0, 0))
  kv_tile = pl.BlockSpec((None, bk, None, d), lambda kj, bi, kh: (bi, kj, kh, 0))
  rows_grp = pl.BlockSpec((None, None, g, tp), lambda kj, bi, kh: (bi, kh, 0, 0))
  seg_specs = [pl.BlockSpec((None, tp), lambda kj, bi, kh: (bi, 0)),
               pl.BlockSpec((None, bk), lambda kj, bi, kh: (bi, kj))] if c.has_seg else []
  grp = lambda x: x.reshape(b, tp, hk, g, d)
  rows = lambda x: x.reshape(b, hk, g, tp)
  dk, dv = pl.pallas_call(
      functools.partial(_gpu_dkdv_kernel, c=c, nq=nq, groups=g),
      grid=(nk, b, hk),
      in_specs=[q_grp, kv_tile, kv_tile, q_grp, rows_grp, rows_grp, rows_grp, *seg_specs],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=c.interpret, name="altbench_flash_dkdv",
  )(grp(q), k, v, grp(do), rows(m), rows(ll), rows(delta), *seg)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gpu_flash(q, k, v, q_ids, kv_ids, c):
  return _gpu_fwd(q, k, v, q_ids, kv_ids, c)[0]


def _gpu_flash_fwd(q, k, v, q_ids, kv_ids, c):
  o, m, ll = _gpu_fwd(q, k, v, q_ids, kv_ids, c)
  return o, (q, k, v, q_ids, kv_ids, o, m, ll)


def _gpu_flash_bwd(c, res, do):
  q, k, v, q_ids, kv_ids, o, m, ll = res
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  m = jnp.where(jnp.arange(m.shape[-1]) < c.q_len, m, _BIG)  # pad rows: p == 0 everywhere
  dq, dk, dv = _gpu_bwd(q, k, v, q_ids, kv_ids, m, ll, delta, do.astype(q.dtype), c)
  return dq, dk, dv, None, None


_gpu_flash.defvjp(_gpu_flash_fwd, _gpu_flash_bwd)


# --------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels. Refs are (rows, d) tiles of (b, h, L, d) arrays; per-row values are
# (rows, 128) lane-replicated; q ids (rows, 128), kv ids (8, cols).


def _lanes(x, n):
  """(rows, 128) lane-replicated -> (rows, n) without a lane broadcast Mosaic may not support."""
  if n % _LANES == 0:
    return x if n == _LANES else jnp.tile(x, (1, n // _LANES))
  if n < _LANES:
    return x[:, :n]
  raise ValueError(f"flash_attention(tpu): width {n} must be < 128 or a multiple of 128")


def _tpu_tile_mask(s, qi, kj, qid_ref, kid_ref, c, pad_len):
  bq, bk = s.shape
  row = lax.broadcasted_iota(jnp.int32, (bq, bk), 0) + qi * bq
  col = lax.broadcasted_iota(jnp.int32, (bq, bk), 1) + kj * bk
  q_ids = _lanes(qid_ref[...], bk) if c.has_seg else None
  kv_ids = kid_ref[:1, :] if c.has_seg else None
  return _mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal, kv_len=pad_len)


def _when_masked(run, needs_mask, step):
  """Run step(masked=True/False) under `run`, choosing the masked variant where `needs_mask`."""
  if isinstance(needs_mask, bool):
    if run is True:
      step(needs_mask)
    else:
      pl.when(run)(lambda: step(needs_mask))
  else:
    pl.when(jnp.logical_and(run, needs_mask))(lambda: step(True))
    pl.when(jnp.logical_and(run, jnp.logical_not(needs_mask)))(lambda: step(False))


def _tpu_row_block_needs(qi, kj, bq, bk, c, nk, pad):
  """(run, needs_mask) for q block qi against kv block kj."""
  if c.causal:
    run = kj * bk <= (qi + 1) * bq - 1                     # some key at or left of the diagonal
    needs = (kj + 1) * bk - 1 > qi * bq                    # some key right of the diagonal
    return run, (True if c.has_seg else needs)
  return True, (True if c.has_seg else (kj >= c.kv_len // bk) if pad else False)  # any pad key in block kj


def _tpu_fwd_kernel(*refs, c, nk):
  if c.has_seg:
    q_ref, k_ref, v_ref, qid_ref, kid_ref, o_ref, m_out, ll_out, m_ref, l_ref, acc_ref = refs
  else:
    (q_ref, k_ref, v_ref, o_ref, m_out, ll_out, m_ref, l_ref, acc_ref), qid_ref, kid_ref = refs, None, None
  bq, bk = c.blocks.block_q, c.blocks.block_k
  qi, kj = pl.program_id(2), pl.program_id(3)
  pad = nk * bk != c.kv_len and not c.causal

  @pl.when(kj == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked):
    s = _dot(q_ref[...], k_ref[...], trans_b=True) * (c.scale * _LOG2E)
    if masked:
      s, _ = _tpu_tile_mask(s, qi, kj, qid_ref, kid_ref, c, c.kv_len if pad else None)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (bq, 128)
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - _lanes(m_new, bk))
    m_ref[...] = m_new
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_ref[...] = acc_ref[...] * _lanes(alpha, v.shape[-1]) + _dot(p.astype(v.dtype), v)

  _when_masked(*_tpu_row_block_needs(qi, kj, bq, bk, c, nk, pad), step)

  @pl.when(kj == nk - 1)
  def _():
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / _lanes(l, acc_ref.shape[-1])).astype(o_ref.dtype)
    m_out[...] = m_ref[...]
    ll_out[...] = jnp.log2(l)


def _tpu_dq_kernel(*refs, c, nk):
  if c.has_seg:
    q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, qid_ref, kid_ref, dq_ref, acc_ref = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, dq_ref, acc_ref) = refs
    qid_ref = kid_ref = None
  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  qi, kj = pl.program_id(2), pl.program_id(3)
  pad = nk * bk != c.kv_len and not c.causal

  @pl.when(kj == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked):
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    s = _dot(q_ref[...], k, trans_b=True) * (c.scale * _LOG2E)
    visible = None
    if masked:
      s, visible = _tpu_tile_mask(s, qi, kj, qid_ref, kid_ref, c, c.kv_len if pad else None)
    p = jnp.exp2(s - _lanes(m_ref[...], bk) - _lanes(ll_ref[...], bk))
    ds = p * (_dot(do, v, trans_b=True) - _lanes(delta_ref[...], bk))
    if visible is not None:
      ds = jnp.where(visible, ds, 0.0)
    acc_ref[...] += _dot(ds.astype(k.dtype), k)

  _when_masked(*_tpu_row_block_needs(qi, kj, bq, bk, c, nk, pad), step)

  @pl.when(kj == nk - 1)
  def _():
    dq_ref[...] = (acc_ref[...] * c.scale).astype(dq_ref.dtype)


def _tpu_dkdv_kernel(*refs, c, nq, groups):
  if c.has_seg:
    (q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, qid_ref, kid_ref, dk_ref, dv_ref, dk_acc,
     dv_acc) = refs
  else:
    (q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc) = refs
    qid_ref = kid_ref = None
  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  kj, j = pl.program_id(2), pl.program_id(3)
  qi = lax.rem(j, np.int32(nq))

  @pl.when(j == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(masked):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = _dot(q, k, trans_b=True) * (c.scale * _LOG2E)
    visible = None
    if masked:  # pad keys need no mask: a key column only feeds its own (discarded) dk/dv rows
      s, visible = _tpu_tile_mask(s, qi, kj, qid_ref, kid_ref, c, None)
    p = jnp.exp2(s - _lanes(m_ref[...], bk) - _lanes(ll_ref[...], bk))
    dv_acc[...] += _dot(p.T.astype(do.dtype), do)  # transpose in f32, as jax's TPU kernels do
    ds = p * (_dot(do, v, trans_b=True) - _lanes(delta_ref[...], bk))
    if visible is not None:
      ds = jnp.where(visible, ds, 0.0)
    dk_acc[...] += _dot(ds.T.astype(q.dtype), q)

  _when_masked(*_tpu_row_block_needs(qi, kj, bq, bk, c, None, False), step)

  @pl.when(j == groups * nq - 1)
  def _():
    dk_ref[...] = (dk_acc[...] * c.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _tpu_interpret(c):
  return _tpu_interpret_params() if c.interpret is True else c.interpret


def _tpu_seg_specs(bq, bk, q_map, kv_map):
  return [pl.BlockSpec((None, bq, _LANES), q_map), pl.BlockSpec((None, _SUBLANES, bk), kv_map)]


def _tpu_kv_block(qi, kj, bq, bk, nk, causal):
  # Causal: blocks past the diagonal are skipped; pointing them at the last needed block means the
  # pipeline sees an unchanged block index and issues no DMA for them.
  if not causal:
    return kj
  return jnp.minimum(kj, jnp.minimum(_idiv((qi + 1) * bq - 1, bk), nk - 1))


def _tpu_q_major_call(kernel, q, k, v, extra_rows, q_ids, kv_ids, c, bq, bk, outs, scratch, name):
  """pallas_call over grid (b, h, q blocks, kv blocks): the forward and dq kernels."""
  b, h, tp, d = q.shape
  hk, sp = k.shape[1], k.shape[2]
  g, nq, nk = h // hk, tp // bq, sp // bk
  q_map = lambda bi, hi, qi, kj: (bi, hi, qi, 0)
  kv_map = lambda bi, hi, qi, kj: (bi, _idiv(hi, g), _tpu_kv_block(qi, kj, bq, bk, nk, c.causal), 0)
  q_spec, kv_spec = pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map)
  row_spec = pl.BlockSpec((None, None, bq, _LANES), q_map)
  in_specs = [q_spec, kv_spec, kv_spec]
  args = [q, k, v]
  for x in extra_rows:  # (array, "tile" | "rows")
    in_specs.append(q_spec if x[1] == "tile" else row_spec)
    args.append(x[0])
  if c.has_seg:
    in_specs += _tpu_seg_specs(
        bq, bk, lambda bi, hi, qi, kj: (bi, qi, 0),
        lambda bi, hi, qi, kj: (bi, 0, _tpu_kv_block(qi, kj, bq, bk, nk, c.causal)))
    args += [q_ids, kv_ids]
  out_specs = [q_spec if kind == "tile" else row_spec for kind, _ in outs]
  return pl.pallas_call(
      functools.partial(kernel, c=c, nk=nk),
      grid=(b, h, nq, nk),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[shape for _, shape in outs],
      scratch_shapes=scratch,
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_tpu_interpret(c),
      name=name,
  )(*args)


def _tpu_fwd(q, k, v, q_ids, kv_ids, c):
  b, h, tp, d = q.shape
  bq, bk = c.blocks.block_q, c.blocks.block_k
  outs = [("tile", jax.ShapeDtypeStruct(q.shape, q.dtype)),
          ("rows", jax.ShapeDtypeStruct((b, h, tp, _LANES), jnp.float32)),
          ("rows", jax.ShapeDtypeStruct((b, h, tp, _LANES), jnp.float32))]
  scratch = [_tpu_vmem((bq, _LANES), jnp.float32), _tpu_vmem((bq, _LANES), jnp.float32),
             _tpu_vmem((bq, d), jnp.float32)]
  return _tpu_q_major_call(_tpu_fwd_kernel, q, k, v, [], q_ids, kv_ids, c, bq, bk, outs, scratch,
                           "altbench_flash_fwd_tpu")


def _tpu_bwd(q, k, v, q_ids, kv_ids, m, ll, delta, do, c):
  b, h, tp, d = q.shape
  hk, sp = k.shape[1], k.shape[2]
  g = h // hk

  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  (dq,) = _tpu_q_major_call(
      _tpu_dq_kernel, q, k, v, [(do, "tile"), (m, "rows"), (ll, "rows"), (delta, "rows")], q_ids, kv_ids, c,
      bq, bk, [("tile", jax.ShapeDtypeStruct(q.shape, q.dtype))], [_tpu_vmem((bq, d), jnp.float32)],
      "altbench_flash_dq_tpu")

  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  nq, nk = tp // bq, sp // bk

  def q_block(kj, j):
    qi = lax.rem(j, np.int32(nq))
    if c.causal:  # q blocks above the diagonal are skipped: repeat the first needed one (no DMA)
      qi = jnp.maximum(qi, _idiv(kj * bk, bq))
    return qi

  q_map = lambda bi, kh, kj, j: (bi, kh * g + _idiv(j, nq), q_block(kj, j), 0)
  kv_map = lambda bi, kh, kj, j: (bi, kh, kj, 0)
  q_spec, kv_spec = pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map)
  row_spec = pl.BlockSpec((None, None, bq, _LANES), q_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, row_spec]
  args = [q, k, v, do, m, ll, delta]
  if c.has_seg:
    in_specs += _tpu_seg_specs(bq, bk, lambda bi, kh, kj, j: (bi, q_block(kj, j), 0),
                               lambda bi, kh, kj, j: (bi, 0, kj))
    args += [q_ids, kv_ids]
  dk, dv = pl.pallas_call(
      functools.partial(_tpu_dkdv_kernel, c=c, nq=nq, groups=g),
      grid=(b, hk, nk, g * nq),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[_tpu_vmem((bk, d), jnp.float32), _tpu_vmem((bk, d), jnp.float32)],
      compiler_params=_tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_tpu_interpret(c),
      name="altbench_flash_dkdv_tpu",
  )(*args)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _tpu_flash(q, k, v, q_ids, kv_ids, c):
  return _tpu_fwd(q, k, v, q_ids, kv_ids, c)[0]


def _tpu_flash_fwd(q, k, v, q_ids, kv_ids, c):
  o, m, ll = _tpu_fwd(q, k, v, q_ids, kv_ids, c)
  return o, (q, k, v, q_ids, kv_ids, o, m, ll)


def _tpu_flash_bwd(c, res, do):
  q, k, v, q_ids, kv_ids, o, m, ll = res
  delta = jnp.einsum("bhtd,bhtd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  delta = jnp.broadcast_to(delta[..., None], m.shape)
  m = jnp.where((jnp.arange(m.shape[2]) < c.q_len)[:, None], m, _BIG)  # pad rows: p == 0
  dq, dk, dv = _tpu_bwd(q, k, v, q_ids, kv_ids, m, ll, delta, do.astype(q.dtype), c)
  return dq, dk, dv, None, None


_tpu_flash.defvjp(_tpu_flash_fwd, _tpu_flash_bwd)


# --------------------------------------------------------------------------------------------
# Public entry point


def _round_up(x, m):
  return -(-x // m) * m


def _pow2_at_least(x):
  return 1 << max(0, int(x) - 1).bit_length()


def _fit_blocks(bs, target, q_len, kv_len):
  """Clamp a BlockSizes to the lengths: no block longer than the padded sequence needs to be."""
  floor = 16 if target == "gpu" else _LANES  # Triton dots need >= 16; TPU lanes are 128 wide
  fq = lambda x: min(x, max(floor, _pow2_at_least(q_len)))
  fk = lambda x: min(x, max(floor, _pow2_at_least(kv_len)))
  return dataclasses.replace(bs, block_q=fq(bs.block_q), block_k=fk(bs.block_k),
                             block_q_dkv=fq(bs.block_q_dkv), block_k_dkv=fk(bs.block_k_dkv),
                             block_q_dq=fq(bs.block_q_dq), block_k_dq=fk(bs.block_k_dq))


def flash_attention(q, k, v, *, causal, segment_ids=None, softmax_scale=None, mask=None, target=None,
                    interpret=None, block_sizes=None):
  """Flash attention with kernels.attention's contract (see there); Pallas forward and backward.

  q: (b, T, h, d); k, v: (b, S, hk, d), h % hk == 0. segment_ids: (b, T) or (q_ids, kv_ids).
  target: "gpu" (Triton) or "tpu" (Mosaic); default from jax.default_backend(), and "gpu" kernels
    (interpreted) on a backend that has neither.
  interpret: run in Pallas interpret mode; default True exactly when the backend is not `target`'s.
  block_sizes: a BlockSizes (taken as given, except clamped to the lengths); default from _BLOCKS.
  """
  if mask is not None:
    raise NotImplementedError("flash_attention (impl='pallas') does not support a dense `mask`; "
                              "use impl='xla' or 'reference' (impl='auto' falls back to xla for it)")
  backend = jax.default_backend()
  target = target or backend_target(backend) or "gpu"
  if target not in TARGETS:
    raise ValueError(f"flash_attention: target={target!r} is not one of {TARGETS}")
  if interpret is None:
    interpret = backend != target
  b, t, h, d = q.shape
  s, hk = k.shape[1], k.shape[2]
  if d > MAX_HEAD_DIM:
    raise NotImplementedError(f"flash_attention: head_dim {d} > {MAX_HEAD_DIM}")
  if causal and t != s:
    raise ValueError(f"flash_attention: causal needs equal q and kv lengths; got {t} and {s}")
  scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)

  bs = _fit_blocks(block_sizes or default_block_sizes(target, d), target, t, s)
  c = _Cfg(causal=bool(causal), scale=scale, q_len=t, kv_len=s, has_seg=segment_ids is not None,
           blocks=bs, interpret=interpret)
  tp = _round_up(t, max(bs.block_q, bs.block_q_dkv, bs.block_q_dq))
  sp = _round_up(s, max(bs.block_k, bs.block_k_dkv, bs.block_k_dq))
  # Triton tiles must have power-of-two sizes: zero-pad head_dim (q.k and the output's real
  # columns are unchanged; the scale was fixed above from the real d).
  dp = max(16, _pow2_at_least(d)) if target == "gpu" else d
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))
  q, k, v = pad(q, tp), pad(k, sp), pad(v, sp)

  q_ids = kv_ids = None
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    # Pad ids are arbitrary: pad query rows are discarded, pad keys masked by position.
    q_ids = jnp.pad(q_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))
    kv_ids = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0), (0, sp - s)))

  if target == "gpu":
    out = _gpu_flash(q, k, v, q_ids, kv_ids, c)
  else:
    if q_ids is not None:  # lane-/sublane-replicated layouts (see module docstring)
      q_ids = jnp.broadcast_to(q_ids[:, :, None], (b, tp, _LANES))
      kv_ids = jnp.broadcast_to(kv_ids[:, None, :], (b, _SUBLANES, sp))
    to_bhld = lambda x: jnp.swapaxes(x, 1, 2)
    out = to_bhld(_tpu_flash(to_bhld(q), to_bhld(k), to_bhld(v), q_ids, kv_ids, c))
  return out[:, :t, :, :d]
