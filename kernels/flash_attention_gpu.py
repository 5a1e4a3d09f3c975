"""Flash attention's GPU kernels: Pallas on the Triton backend (forward, dq, dk/dv).

Triton rather than Mosaic GPU because it runs on every NVIDIA GPU from Ampere (sm80) on, not just
Hopper/Blackwell, it is what jax's own ``jax.experimental.pallas.ops.gpu.attention`` is written in,
and its programs are plain "one tile, loop over the rest" code that is easy to keep correct. Mosaic
GPU (warp-specialised, TMA, wgmma) can go faster on H100 but is Hopper-only and far more intricate.

Layout (b, L, h, d), the caller's, untouched; per-row statistics (b, h, L). Forward and dq: grid
(q blocks, b, h), each program loops over kv blocks with ``lax.fori_loop``; for causal attention
the loop stops at the diagonal block (the fully-masked blocks are never visited) and the q blocks
are issued longest-first. dk/dv: grid (kv blocks, b, kv heads), each program loops over the q heads
of its group and the q blocks at or below the diagonal, so grouped KV heads are reduced inside the
kernel (no repeat of k/v and no per-q-head dk/dv). K/V of the forward and dq kernels are indexed at
head ``h // groups``.

The interface kernels/flash_attention.py drives (the TPU module has the same): ``LAYOUT``,
``to_kernel`` / ``from_kernel`` (caller's layout <-> the kernels'), ``fwd`` -> (o, m, log2 l) and
``bwd`` -> (dq, dk, dv); ``c`` is flash_attention._Cfg.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from altbench.kernels.pallas_common import LOG2E, cdiv, dot, fori, idiv, mask_scores, seg_refs, triton_params

LAYOUT = "bthd"  # of q, k, v, o, as einsum letters


def to_kernel(q, k, v, q_ids, kv_ids):
  return q, k, v, q_ids, kv_ids


def from_kernel(o):
  return o


# --------------------------------------------------------------------------------------------
# Kernels. Refs are (rows, d) tiles of the (b, L, h, d) arrays.


def _q_block(pid, nq, causal):
  # Causal programs differ in work (row i visits i / block_k kv blocks): issue the longest first
  # so the short ones fill in the tail of the launch.
  return nq - 1 - pid if causal else pid


def _kv_loops(qi, bq, bk, nk, c):
  """[(start, stop, masked)] over kv blocks for q block qi: visible blocks only, masks where needed."""
  if c.causal:
    stop = jnp.minimum(cdiv((qi + 1) * bq, bk), nk)   # past the diagonal block: all masked, skipped
    if c.has_seg:
      return [(0, stop, True)]
    full = jnp.minimum(idiv(qi * bq, bk), stop)         # blocks entirely left of the diagonal
    return [(0, full, False), (full, stop, True)]
  if c.has_seg:
    return [(0, nk, True)]
  # The kv length is padded to the largest of the fwd / dq / dkv tiles, so with a smaller tile here
  # more than the last block can hold pad keys: mask from the first of them, skip blocks of pads only.
  full, stop = c.kv_len // bk, min(-(-c.kv_len // bk), nk)
  return [(0, full, False)] + ([(full, stop, True)] if stop > full else [])


def _fwd_kernel(*refs, c, nq, nk):
  q_ref, k_ref, v_ref, qid_ref, kid_ref, o_ref, m_ref, ll_ref = seg_refs(refs, 3, c.has_seg)
  bq, bk = c.blocks.block_q, c.blocks.block_k
  qi = _q_block(pl.program_id(0), nq, c.causal)
  q = q_ref[...]
  row = (qi * bq + jnp.arange(bq))[:, None]
  q_ids = qid_ref[...][:, None] if c.has_seg else None
  pad_len = None if c.causal or nk * bk == c.kv_len else c.kv_len  # causal already hides pad keys
  s_scale = c.scale * LOG2E

  def body(kj, carry, masked):
    acc, m, l = carry
    ks = pl.ds(pl.multiple_of(kj * bk, bk), bk)
    s = dot(q, k_ref[ks, :], "nt") * s_scale
    if masked:
      col = (kj * bk + jnp.arange(bk))[None, :]
      kv_ids = kid_ref[ks][None, :] if c.has_seg else None
      s, _ = mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal, kv_len=pad_len)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    v = v_ref[ks, :]
    return acc * alpha[:, None] + dot(p.astype(v.dtype), v), m_new, l * alpha + jnp.sum(p, axis=1)

  carry = (jnp.zeros((bq, q.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  for lo, hi, masked in _kv_loops(qi, bq, bk, nk, c):
    carry = fori(lo, hi, functools.partial(body, masked=masked), carry)
  acc, m, l = carry
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)  # l >= 1: the row max contributes exp2(0)
  m_ref[...] = m
  ll_ref[...] = jnp.log2(l)


def _dq_kernel(*refs, c, nq, nk):
  (q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, qid_ref, kid_ref,
   dq_ref) = seg_refs(refs, 7, c.has_seg)
  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  qi = _q_block(pl.program_id(0), nq, c.causal)
  q, do = q_ref[...], do_ref[...]
  m, ll, delta = m_ref[...][:, None], ll_ref[...][:, None], delta_ref[...][:, None]
  row = (qi * bq + jnp.arange(bq))[:, None]
  q_ids = qid_ref[...][:, None] if c.has_seg else None
  pad_len = None if c.causal or nk * bk == c.kv_len else c.kv_len
  s_scale = c.scale * LOG2E

  def body(kj, dq, masked):
    ks = pl.ds(pl.multiple_of(kj * bk, bk), bk)
    k, v = k_ref[ks, :], v_ref[ks, :]
    s = dot(q, k, "nt") * s_scale
    visible = None
    if masked:
      col = (kj * bk + jnp.arange(bk))[None, :]
      kv_ids = kid_ref[ks][None, :] if c.has_seg else None
      s, visible = mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal, kv_len=pad_len)
    p = jnp.exp2(s - m - ll)
    ds = p * (dot(do, v, "nt") - delta)
    if visible is not None:  # a fully-masked row has p > 0 at masked keys; its logits get no grad
      ds = jnp.where(visible, ds, 0.0)
    return dq + dot(ds.astype(k.dtype), k)

  dq = jnp.zeros((bq, q.shape[-1]), jnp.float32)
  for lo, hi, masked in _kv_loops(qi, bq, bk, nk, c):
    dq = fori(lo, hi, functools.partial(body, masked=masked), dq)
  dq_ref[...] = (dq * c.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, c, nq, groups):
  # q/do refs are (T, groups, d) (all q heads of this kv head), m/ll/delta (groups, T).
  (q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, qid_ref, kid_ref,
   dk_ref, dv_ref) = seg_refs(refs, 7, c.has_seg)
  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  kj = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  col = (kj * bk + jnp.arange(bk))[None, :]
  kv_ids = kid_ref[...][None, :] if c.has_seg else None
  s_scale = c.scale * LOG2E
  # Pad keys need no mask here: a key column only feeds its own dk/dv rows, which are sliced off.
  if c.causal:
    first = idiv(kj * bk, bq)                                  # earlier q blocks see none of it
    clear = jnp.minimum(cdiv((kj + 1) * bk - 1, bq), nq)       # from here on all rows see all keys
    loops = [(first, nq, True)] if c.has_seg else [(first, clear, True), (clear, nq, False)]
  else:
    loops = [(0, nq, c.has_seg)]

  def body(qi, carry, j, masked):
    dk, dv = carry
    qs = pl.ds(pl.multiple_of(qi * bq, bq), bq)
    q, do = q_ref[qs, j, :], do_ref[qs, j, :]
    s = dot(q, k, "nt") * s_scale
    visible = None
    if masked:
      row = (qi * bq + jnp.arange(bq))[:, None]
      q_ids = qid_ref[qs][:, None] if c.has_seg else None
      s, visible = mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal)
    p = jnp.exp2(s - m_ref[j, qs][:, None] - ll_ref[j, qs][:, None])
    dv = dv + dot(p.astype(do.dtype).T, do)
    ds = p * (dot(do, v, "nt") - delta_ref[j, qs][:, None])
    if visible is not None:
      ds = jnp.where(visible, ds, 0.0)
    return dk + dot(ds.astype(q.dtype).T, q), dv

  def per_head(j, carry):
    for lo, hi, masked in loops:
      carry = fori(lo, hi, functools.partial(body, j=j, masked=masked), carry)
    return carry

  zeros = jnp.zeros((bk, k.shape[-1]), jnp.float32)
  carry = (zeros, zeros)
  dk, dv = per_head(0, carry) if groups == 1 else lax.fori_loop(0, groups, per_head, carry)
  dk_ref[...] = (dk * c.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def fwd(q, k, v, q_ids, kv_ids, c):
  b, tp, h, d = q.shape
  sp, hk = k.shape[1], k.shape[2]
  g, bq, bk = h // hk, c.blocks.block_q, c.blocks.block_k
  nq, nk = tp // bq, sp // bk
  qb = lambda i: _q_block(i, nq, c.causal)
  in_specs = [pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qb(i), hi, 0)),
              pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, idiv(hi, g), 0)),
              pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, idiv(hi, g), 0))]
  args = [q, k, v]
  if c.has_seg:
    in_specs += [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, qb(i))),
                 pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0))]
    args += [q_ids, kv_ids]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, c=c, nq=nq, nk=nk),
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qb(i), hi, 0)),
                 pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qb(i))),
                 pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qb(i)))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      compiler_params=triton_params(c.blocks.num_warps, c.blocks.num_stages),
      interpret=c.interpret,
      name="altbench_flash_fwd",
  )(*args)


def bwd(q, k, v, q_ids, kv_ids, m, ll, delta, do, c):
  b, tp, h, d = q.shape
  sp, hk = k.shape[1], k.shape[2]
  g = h // hk
  params = triton_params(c.blocks.num_warps, c.blocks.num_stages)
  seg = [q_ids, kv_ids] if c.has_seg else []

  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  nq, nk = tp // bq, sp // bk
  qb = lambda i: _q_block(i, nq, c.causal)
  q_tile = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qb(i), hi, 0))
  kv_all = pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, idiv(hi, g), 0))
  row_tile = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qb(i)))
  seg_specs = [pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, qb(i))),
               pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0))] if c.has_seg else []
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, c=c, nq=nq, nk=nk),
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
      functools.partial(_dkdv_kernel, c=c, nq=nq, groups=g),
      grid=(nk, b, hk),
      in_specs=[q_grp, kv_tile, kv_tile, q_grp, rows_grp, rows_grp, rows_grp, *seg_specs],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=c.interpret, name="altbench_flash_dkdv",
  )(grp(q), k, v, grp(do), rows(m), rows(ll), rows(delta), *seg)
  return dq, dk, dv
