"""Flash attention's TPU kernels: Pallas TPU (Mosaic) (forward, dq, dk/dv).

Layout (b, h, L, d) (``to_kernel`` transposes the caller's (b, L, h, d)) so that blocks are
(rows, head_dim) tiles in the (8, 128) layout. Forward and dq: grid (b, h, q blocks, kv blocks) with
the kv dimension "arbitrary" (sequential, accumulating into VMEM scratch) and the others "parallel";
dk/dv: grid (b, kv heads, kv blocks, groups * q blocks). Causally fully-masked blocks are skipped
with ``pl.when`` and their index maps are clamped to the last needed block so that no DMA is issued
for them. Per-row statistics (max, sum, delta) and q segment ids are stored replicated across 128
lanes, (b, h, L, 128), and kv segment ids across 8 sublanes, as jax's own TPU flash attention does,
so the kernel never needs a 1-D vector or a transpose of one.

The interface is the GPU module's (see kernels/flash_attention_gpu.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from altbench.kernels.pallas_common import (LANES, LOG2E, SUBLANES, dot, idiv, mask_scores, seg_refs,
                                            tpu_interpret, tpu_params, tpu_vmem)

LAYOUT = "bhtd"  # of q, k, v, o, as einsum letters


def to_kernel(q, k, v, q_ids, kv_ids):
  if q_ids is not None:  # lane-/sublane-replicated layouts (see above)
    q_ids = jnp.broadcast_to(q_ids[:, :, None], q_ids.shape + (LANES,))
    kv_ids = jnp.broadcast_to(kv_ids[:, None, :], (kv_ids.shape[0], SUBLANES, kv_ids.shape[1]))
  return jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), q_ids, kv_ids


def from_kernel(o):
  return jnp.swapaxes(o, 1, 2)


# --------------------------------------------------------------------------------------------
# Kernels. Refs are (rows, d) tiles of (b, h, L, d) arrays; per-row values are (rows, 128)
# lane-replicated; q ids (rows, 128), kv ids (8, cols).


def _lanes(x, n):
  """(rows, 128) lane-replicated -> (rows, n) without a lane broadcast Mosaic may not support."""
  if n % LANES == 0:
    return x if n == LANES else jnp.tile(x, (1, n // LANES))
  if n < LANES:
    return x[:, :n]
  raise ValueError(f"flash_attention(tpu): width {n} must be < 128 or a multiple of 128")


def _tile_mask(s, qi, kj, qid_ref, kid_ref, c, pad_len):
  bq, bk = s.shape
  row = lax.broadcasted_iota(jnp.int32, (bq, bk), 0) + qi * bq
  col = lax.broadcasted_iota(jnp.int32, (bq, bk), 1) + kj * bk
  q_ids = _lanes(qid_ref[...], bk) if c.has_seg else None
  kv_ids = kid_ref[:1, :] if c.has_seg else None
  return mask_scores(s, row, col, q_ids, kv_ids, causal=c.causal, kv_len=pad_len)


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


def _row_block_needs(qi, kj, bq, bk, c, nk, pad):
  """(run, needs_mask) for q block qi against kv block kj."""
  if c.causal:
    run = kj * bk <= (qi + 1) * bq - 1                     # some key at or left of the diagonal
    needs = (kj + 1) * bk - 1 > qi * bq                    # some key right of the diagonal
    return run, (True if c.has_seg else needs)
  return True, (True if c.has_seg else (kj >= c.kv_len // bk) if pad else False)  # any pad key in block kj


def _fwd_kernel(*refs, c, nk):
  (q_ref, k_ref, v_ref, qid_ref, kid_ref,
   o_ref, m_out, ll_out, m_ref, l_ref, acc_ref) = seg_refs(refs, 3, c.has_seg)
  bq, bk = c.blocks.block_q, c.blocks.block_k
  qi, kj = pl.program_id(2), pl.program_id(3)
  pad = nk * bk != c.kv_len and not c.causal

  @pl.when(kj == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked):
    s = dot(q_ref[...], k_ref[...], "nt") * (c.scale * LOG2E)
    if masked:
      s, _ = _tile_mask(s, qi, kj, qid_ref, kid_ref, c, c.kv_len if pad else None)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (bq, 128)
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - _lanes(m_new, bk))
    m_ref[...] = m_new
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_ref[...] = acc_ref[...] * _lanes(alpha, v.shape[-1]) + dot(p.astype(v.dtype), v)

  _when_masked(*_row_block_needs(qi, kj, bq, bk, c, nk, pad), step)

  @pl.when(kj == nk - 1)
  def _():
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / _lanes(l, acc_ref.shape[-1])).astype(o_ref.dtype)
    m_out[...] = m_ref[...]
    ll_out[...] = jnp.log2(l)


def _dq_kernel(*refs, c, nk):
  (q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, qid_ref, kid_ref,
   dq_ref, acc_ref) = seg_refs(refs, 7, c.has_seg)
  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  qi, kj = pl.program_id(2), pl.program_id(3)
  pad = nk * bk != c.kv_len and not c.causal

  @pl.when(kj == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked):
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    s = dot(q_ref[...], k, "nt") * (c.scale * LOG2E)
    visible = None
    if masked:
      s, visible = _tile_mask(s, qi, kj, qid_ref, kid_ref, c, c.kv_len if pad else None)
    p = jnp.exp2(s - _lanes(m_ref[...], bk) - _lanes(ll_ref[...], bk))
    ds = p * (dot(do, v, "nt") - _lanes(delta_ref[...], bk))
    if visible is not None:
      ds = jnp.where(visible, ds, 0.0)
    acc_ref[...] += dot(ds.astype(k.dtype), k)

  _when_masked(*_row_block_needs(qi, kj, bq, bk, c, nk, pad), step)

  @pl.when(kj == nk - 1)
  def _():
    dq_ref[...] = (acc_ref[...] * c.scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, c, nq, groups):
  (q_ref, k_ref, v_ref, do_ref, m_ref, ll_ref, delta_ref, qid_ref, kid_ref,
   dk_ref, dv_ref, dk_acc, dv_acc) = seg_refs(refs, 7, c.has_seg)
  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  kj, j = pl.program_id(2), pl.program_id(3)
  qi = lax.rem(j, np.int32(nq))

  @pl.when(j == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def step(masked):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s = dot(q, k, "nt") * (c.scale * LOG2E)
    visible = None
    if masked:  # pad keys need no mask: a key column only feeds its own (discarded) dk/dv rows
      s, visible = _tile_mask(s, qi, kj, qid_ref, kid_ref, c, None)
    p = jnp.exp2(s - _lanes(m_ref[...], bk) - _lanes(ll_ref[...], bk))
    dv_acc[...] += dot(p.T.astype(do.dtype), do)   # transpose in f32, as jax's TPU kernels do
    ds = p * (dot(do, v, "nt") - _lanes(delta_ref[...], bk))
    if visible is not None:
      ds = jnp.where(visible, ds, 0.0)
    dk_acc[...] += dot(ds.T.astype(q.dtype), q)

  _when_masked(*_row_block_needs(qi, kj, bq, bk, c, None, False), step)

  @pl.when(j == groups * nq - 1)
  def _():
    dk_ref[...] = (dk_acc[...] * c.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _seg_specs(bq, bk, q_map, kv_map):
  return [pl.BlockSpec((None, bq, LANES), q_map), pl.BlockSpec((None, SUBLANES, bk), kv_map)]


def _kv_block(qi, kj, bq, bk, nk, causal):
  # Causal: blocks past the diagonal are skipped; pointing them at the last needed block means the
  # pipeline sees an unchanged block index and issues no DMA for them.
  if not causal:
    return kj
  return jnp.minimum(kj, jnp.minimum(idiv((qi + 1) * bq - 1, bk), nk - 1))


def _q_major_call(kernel, q, k, v, extra_rows, q_ids, kv_ids, c, bq, bk, outs, scratch, name):
  """pallas_call over grid (b, h, q blocks, kv blocks): the forward and dq kernels."""
  b, h, tp, d = q.shape
  hk, sp = k.shape[1], k.shape[2]
  g, nq, nk = h // hk, tp // bq, sp // bk
  q_map = lambda bi, hi, qi, kj: (bi, hi, qi, 0)
  kv_map = lambda bi, hi, qi, kj: (bi, idiv(hi, g), _kv_block(qi, kj, bq, bk, nk, c.causal), 0)
  q_spec, kv_spec = pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map)
  row_spec = pl.BlockSpec((None, None, bq, LANES), q_map)
  in_specs = [q_spec, kv_spec, kv_spec]
  args = [q, k, v]
  for x in extra_rows:  # (array, "tile" | "rows")
    in_specs.append(q_spec if x[1] == "tile" else row_spec)
    args.append(x[0])
  if c.has_seg:
    in_specs += _seg_specs(
        bq, bk, lambda bi, hi, qi, kj: (bi, qi, 0),
        lambda bi, hi, qi, kj: (bi, 0, _kv_block(qi, kj, bq, bk, nk, c.causal)))
    args += [q_ids, kv_ids]
  out_specs = [q_spec if kind == "tile" else row_spec for kind, _ in outs]
  return pl.pallas_call(
      functools.partial(kernel, c=c, nk=nk),
      grid=(b, h, nq, nk),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[shape for _, shape in outs],
      scratch_shapes=scratch,
      compiler_params=tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=tpu_interpret(c.interpret),
      name=name,
  )(*args)


def fwd(q, k, v, q_ids, kv_ids, c):
  b, h, tp, d = q.shape
  bq, bk = c.blocks.block_q, c.blocks.block_k
  outs = [("tile", jax.ShapeDtypeStruct(q.shape, q.dtype)),
          ("rows", jax.ShapeDtypeStruct((b, h, tp, LANES), jnp.float32)),
          ("rows", jax.ShapeDtypeStruct((b, h, tp, LANES), jnp.float32))]
  scratch = [tpu_vmem((bq, LANES), jnp.float32), tpu_vmem((bq, LANES), jnp.float32),
             tpu_vmem((bq, d), jnp.float32)]
  return _q_major_call(_fwd_kernel, q, k, v, [], q_ids, kv_ids, c, bq, bk, outs, scratch,
                           "altbench_flash_fwd_tpu")


def bwd(q, k, v, q_ids, kv_ids, m, ll, delta, do, c):
  b, h, tp, d = q.shape
  hk, sp = k.shape[1], k.shape[2]
  g = h // hk

  bq, bk = c.blocks.block_q_dq, c.blocks.block_k_dq
  (dq,) = _q_major_call(
      _dq_kernel, q, k, v, [(do, "tile"), (m, "rows"), (ll, "rows"), (delta, "rows")], q_ids, kv_ids, c,
      bq, bk, [("tile", jax.ShapeDtypeStruct(q.shape, q.dtype))], [tpu_vmem((bq, d), jnp.float32)],
      "altbench_flash_dq_tpu")

  bq, bk = c.blocks.block_q_dkv, c.blocks.block_k_dkv
  nq, nk = tp // bq, sp // bk

  def q_block(kj, j):
    qi = lax.rem(j, np.int32(nq))
    if c.causal:  # q blocks above the diagonal are skipped: repeat the first needed one (no DMA)
      qi = jnp.maximum(qi, idiv(kj * bk, bq))
    return qi

  q_map = lambda bi, kh, kj, j: (bi, kh * g + idiv(j, nq), q_block(kj, j), 0)
  kv_map = lambda bi, kh, kj, j: (bi, kh, kj, 0)
  q_spec, kv_spec = pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bk, d), kv_map)
  row_spec = pl.BlockSpec((None, None, bq, LANES), q_map)
  in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, row_spec]
  args = [q, k, v, do, m, ll, delta]
  if c.has_seg:
    in_specs += _seg_specs(bq, bk, lambda bi, kh, kj, j: (bi, q_block(kj, j), 0),
                           lambda bi, kh, kj, j: (bi, 0, kj))
    args += [q_ids, kv_ids]
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, c=c, nq=nq, groups=g),
      grid=(b, hk, nk, g * nq),
      in_specs=in_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[tpu_vmem((bk, d), jnp.float32), tpu_vmem((bk, d), jnp.float32)],
      compiler_params=tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=tpu_interpret(c.interpret),
      name="altbench_flash_dkdv_tpu",
  )(*args)
  return dq, dk, dv
