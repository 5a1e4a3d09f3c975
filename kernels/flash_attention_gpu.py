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

Options (issue 26's candidates for closing the gap to cuDNN; fields of flash_attention.BlockSizes, all off
by default, i.e. the kernels as they were; ``altbench bench kernels --tune`` keeps one only where it
measures faster):
* per-kernel launch parameters: ``num_warps_dkdv`` / ``num_stages_dkdv`` / ``num_warps_dq`` /
  ``num_stages_dq`` (None: the forward's ``num_warps`` / ``num_stages``).
* ``one_lse`` (``c.one_lse``): the forward saves one base-2 log-sum-exp per row, m + log2 l, instead of
  its two terms, and the backward kernels read one vector and subtract once (``ll`` is None). Off where
  a query row can see no key at all (``(q_ids, kv_ids)`` segment ids, see flash_attention's Numerics).
* ``prescale_k`` (``c.prescale``): k arrives multiplied by scale * log2(e) (flash_attention does it once,
  in XLA, and saves that k as the residual), so no kernel scales its score tile; dq is then
  (ds @ k') / log2(e).
* ``fused_bwd``: one backward kernel, grid over kv blocks as the dk/dv kernel, which also adds each
  tile's ds @ k into a float32 dq with Triton atomic adds (no dq kernel, no second recomputation of
  the probabilities; the adds' order, and so dq's last bits, vary from run to run).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from altbench.kernels.pallas_common import (LOG2E, cdiv, dot, fori, idiv, mask_scores, named_operands, refs_by_name,
                                            triton_params)

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


def _probs(s, m, ll):
  # (s - m) - ll, not s - (m + ll): see flash_attention's Numerics (rows that see no key).
  return jnp.exp2(s - m) if ll is None else jnp.exp2(s - m - ll)


def _fwd_kernel(*refs, c, nq, nk, names):
  rf = refs_by_name(refs, names)
  bq, bk = c.blocks.block_q, c.blocks.block_k
  qi = _q_block(pl.program_id(0), nq, c.causal)
  q = rf["q"][...]
  row = (qi * bq + jnp.arange(bq))[:, None]
  q_ids = rf["q_ids"][...][:, None] if c.has_seg else None
  pad_len = None if c.causal or nk * bk == c.kv_len else c.kv_len  # causal already hides pad keys
  s_scale = None if c.prescale else c.scale * LOG2E

  def body(kj, carry, masked):
    acc, m, l = carry
    ks = pl.ds(pl.multiple_of(kj * bk, bk), bk)
    s = dot(q, rf["k"][ks, :], "nt")
    if s_scale is not None:
      s = s * s_scale
    if masked:
      col = (kj * bk + jnp.arange(bk))[None, :]
      kv_ids = rf["kv_ids"][ks][None, :] if c.has_seg else None
      s, _ = mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal, kv_len=pad_len)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    v = rf["v"][ks, :]
    return acc * alpha[:, None] + dot(p.astype(v.dtype), v), m_new, l * alpha + jnp.sum(p, axis=1)

  carry = (jnp.zeros((bq, q.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  for lo, hi, masked in _kv_loops(qi, bq, bk, nk, c):
    carry = fori(lo, hi, functools.partial(body, masked=masked), carry)
  acc, m, l = carry
  rf["o"][...] = (acc / l[:, None]).astype(rf["o"].dtype)  # l >= 1: the row max contributes exp2(0)
  if c.one_lse:
    rf["m"][...] = m + jnp.log2(l)
  else:
    rf["m"][...] = m
    rf["ll"][...] = jnp.log2(l)


def _dq_kernel(*refs, c, nq, nk, names):
  rf = refs_by_name(refs, names)
  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  qi = _q_block(pl.program_id(0), nq, c.causal)
  q, do = rf["q"][...], rf["do"][...]
  m = rf["m"][...][:, None]
  ll = rf["ll"][...][:, None] if "ll" in rf else None
  delta = rf["delta"][...][:, None]
  row = (qi * bq + jnp.arange(bq))[:, None]
  q_ids = rf["q_ids"][...][:, None] if c.has_seg else None
  pad_len = None if c.causal or nk * bk == c.kv_len else c.kv_len
  s_scale = None if c.prescale else c.scale * LOG2E

  def body(kj, dq, masked):
    ks = pl.ds(pl.multiple_of(kj * bk, bk), bk)
    k, v = rf["k"][ks, :], rf["v"][ks, :]
    s = dot(q, k, "nt")
    if s_scale is not None:
      s = s * s_scale
    visible = None
    if masked:
      col = (kj * bk + jnp.arange(bk))[None, :]
      kv_ids = rf["kv_ids"][ks][None, :] if c.has_seg else None
      s, visible = mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal, kv_len=pad_len)
    p = _probs(s, m, ll)
    ds = p * (dot(do, v, "nt") - delta)
    if visible is not None:  # a fully-masked row has p > 0 at masked keys; its logits get no grad
      ds = jnp.where(visible, ds, 0.0)
    return dq + dot(ds.astype(k.dtype), k)

  dq = jnp.zeros((bq, q.shape[-1]), jnp.float32)
  for lo, hi, masked in _kv_loops(qi, bq, bk, nk, c):
    dq = fori(lo, hi, functools.partial(body, masked=masked), dq)
  rf["dq"][...] = (dq * _dq_factor(c)).astype(rf["dq"].dtype)


def _dq_factor(c):
  # dq = scale * ds @ k; with k' = k * scale * log2(e) in the kernels that is ds @ k' / log2(e).
  return 1.0 / LOG2E if c.prescale else c.scale


def _dkdv_kernel(*refs, c, nq, groups, kv_padded, names):
  # q/do refs are (T, groups, d) (all q heads of this kv head), m/ll/delta (groups, T).
  # With c.blocks.fused_bwd it also adds each tile's share of dq into "dq_acc" (T, groups, d) float32.
  rf = refs_by_name(refs, names)
  fused = "dq_acc" in rf
  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  kj = pl.program_id(0)
  k, v = rf["k"][...], rf["v"][...]
  col = (kj * bk + jnp.arange(bk))[None, :]
  kv_ids = rf["kv_ids"][...][None, :] if c.has_seg else None
  s_scale = None if c.prescale else c.scale * LOG2E
  # Pad keys need no mask for dk/dv: a key column only feeds its own dk/dv rows, which are sliced
  # off. dq sums over key columns: there pad keys (k == 0, but p may overflow) are masked out.
  pad_len = c.kv_len if fused and kv_padded > c.kv_len else None
  if c.causal:
    first = idiv(kj * bk, bq)                                  # earlier q blocks see none of it
    clear = jnp.minimum(cdiv((kj + 1) * bk - 1, bq), nq)       # from here on all rows see all keys
    loops = ([(first, nq, True)] if c.has_seg or pad_len is not None
             else [(first, clear, True), (clear, nq, False)])
  else:
    loops = [(0, nq, c.has_seg or pad_len is not None)]

  def body(qi, carry, j, masked):
    dk, dv = carry
    qs = pl.ds(pl.multiple_of(qi * bq, bq), bq)
    q, do = rf["q"][qs, j, :], rf["do"][qs, j, :]
    s = dot(q, k, "nt")
    if s_scale is not None:
      s = s * s_scale
    visible = None
    if masked:
      row = (qi * bq + jnp.arange(bq))[:, None]
      q_ids = rf["q_ids"][qs][:, None] if c.has_seg else None
      s, visible = mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal, kv_len=pad_len)
    ll = rf["ll"][j, qs][:, None] if "ll" in rf else None
    p = _probs(s, rf["m"][j, qs][:, None], ll)
    dv = dv + dot(p.astype(do.dtype).T, do)
    ds = p * (dot(do, v, "nt") - rf["delta"][j, qs][:, None])
    if visible is not None:
      ds = jnp.where(visible, ds, 0.0)
    if fused:
      atomic_add(rf["dq_acc"], (qs, j, slice(None)), dot(ds.astype(k.dtype), k))
    return dk + dot(ds.astype(q.dtype).T, q), dv

  def per_head(j, carry):
    for lo, hi, masked in loops:
      carry = fori(lo, hi, functools.partial(body, j=j, masked=masked), carry)
    return carry

  zeros = jnp.zeros((bk, k.shape[-1]), jnp.float32)
  carry = (zeros, zeros)
  dk, dv = per_head(0, carry) if groups == 1 else lax.fori_loop(0, groups, per_head, carry)
  rf["dk"][...] = (dk * c.scale).astype(rf["dk"].dtype)
  rf["dv"][...] = dv.astype(rf["dv"].dtype)


def atomic_add(ref, idx, val):
  """Triton's atomic ref[idx] += val (jax.experimental.pallas.triton.atomic_add; pl.atomic_add on older jax)."""
  from jax.experimental.pallas import triton as plgpu
  fn = getattr(plgpu, "atomic_add", None) or getattr(pl, "atomic_add")
  return fn(ref, idx, val)


def _launch(c, kernel):
  """Triton warps / stages of one kernel: its own BlockSizes fields where set, else the forward's."""
  b = c.blocks
  own = {"fwd": (None, None), "dq": (b.num_warps_dq, b.num_stages_dq),
         "dkdv": (b.num_warps_dkdv, b.num_stages_dkdv)}[kernel]
  return triton_params(own[0] or b.num_warps, own[1] or b.num_stages)


def fwd(q, k, v, q_ids, kv_ids, c):
  b, tp, h, d = q.shape
  sp, hk = k.shape[1], k.shape[2]
  g, bq, bk = h // hk, c.blocks.block_q, c.blocks.block_k
  nq, nk = tp // bq, sp // bk
  qb = lambda i: _q_block(i, nq, c.causal)
  kv_all = pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, idiv(hi, g), 0))
  names, in_specs, args = named_operands(
      ("q", pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qb(i), hi, 0)), q),
      ("k", kv_all, k), ("v", kv_all, v),
      ("q_ids", pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, qb(i))), q_ids),
      ("kv_ids", pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0)), kv_ids))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qb(i)))
  row_shape = jax.ShapeDtypeStruct((b, h, tp), jnp.float32)
  out_names = ["o", "m"] + ([] if c.one_lse else ["ll"])
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, c=c, nq=nq, nk=nk, names=names + out_names),
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qb(i), hi, 0))]
                + [row_spec] * (len(out_names) - 1),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + [row_shape] * (len(out_names) - 1),
      compiler_params=_launch(c, "fwd"),
      interpret=c.interpret,
      name="altbench_flash_fwd",
  )(*args)
  return (*outs, None) if c.one_lse else tuple(outs)


def bwd(q, k, v, q_ids, kv_ids, m, ll, delta, do, c):
  """(dq, dk, dv). ll is None when m holds the whole log-sum-exp (c.one_lse)."""
  b, tp, h, d = q.shape
  sp, hk = k.shape[1], k.shape[2]
  g = h // hk

  dq = None
  if not c.blocks.fused_bwd:
    bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
    nq, nk = tp // bq, sp // bk
    qb = lambda i: _q_block(i, nq, c.causal)
    q_tile = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, qb(i), hi, 0))
    kv_all = pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, idiv(hi, g), 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, qb(i)))
    names, in_specs, args = named_operands(
        ("q", q_tile, q), ("k", kv_all, k), ("v", kv_all, v), ("do", q_tile, do), ("m", row_tile, m),
        ("ll", row_tile, ll), ("delta", row_tile, delta),
        ("q_ids", pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, qb(i))), q_ids),
        ("kv_ids", pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0)), kv_ids))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, c=c, nq=nq, nk=nk, names=names + ["dq"]),
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_launch(c, "dq"), interpret=c.interpret, name="altbench_flash_dq",
    )(*args)

  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  nq, nk = tp // bq, sp // bk
  # All q heads of one kv head in one block: (b, T, hk, g, d), free reshapes of contiguous arrays.
  q_grp = pl.BlockSpec((None, tp, None, g, d), lambda kj, bi, kh: (bi, 0, kh, 0, 0))
  kv_tile = pl.BlockSpec((None, bk, None, d), lambda kj, bi, kh: (bi, kj, kh, 0))
  rows_grp = pl.BlockSpec((None, None, g, tp), lambda kj, bi, kh: (bi, kh, 0, 0))
  grp = lambda x: x.reshape(b, tp, hk, g, d)
  rows = lambda x: None if x is None else x.reshape(b, hk, g, tp)
  fused = c.blocks.fused_bwd
  names, in_specs, args = named_operands(
      ("q", q_grp, grp(q)), ("k", kv_tile, k), ("v", kv_tile, v), ("do", q_grp, grp(do)),
      ("m", rows_grp, rows(m)), ("ll", rows_grp, rows(ll)), ("delta", rows_grp, rows(delta)),
      ("q_ids", pl.BlockSpec((None, tp), lambda kj, bi, kh: (bi, 0)), q_ids),
      ("kv_ids", pl.BlockSpec((None, bk), lambda kj, bi, kh: (bi, kj)), kv_ids),
      # float32 dq, zeros in, every program adds its tiles' shares (an aliased in/out buffer)
      ("dq_acc", q_grp, jnp.zeros((b, tp, hk, g, d), jnp.float32) if fused else None))
  out_names = ["dk", "dv"] + (["dq_acc"] if fused else [])
  out_specs = [kv_tile, kv_tile] + ([q_grp] if fused else [])
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_shape += [jax.ShapeDtypeStruct((b, tp, hk, g, d), jnp.float32)] if fused else []
  outs = pl.pallas_call(
      functools.partial(_dkdv_kernel, c=c, nq=nq, groups=g, kv_padded=sp, names=names + out_names),
      grid=(nk, b, hk),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases={len(names) - 1: 2} if fused else {},
      compiler_params=_launch(c, "dkdv"), interpret=c.interpret,
      name="altbench_flash_bwd_fused" if fused else "altbench_flash_dkdv",
  )(*args)
  dk, dv = outs[0], outs[1]
  if fused:
    dq = (outs[2] * _dq_factor(c)).reshape(q.shape).astype(q.dtype)
  return dq, dk, dv
