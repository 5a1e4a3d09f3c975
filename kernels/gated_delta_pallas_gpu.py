"""The gated delta rule's GPU kernels: Pallas on the Triton backend: the chunks' (I + A)^-1 (grid (chunk,
batch, head), all parallel), then one forward and one backward kernel over the chunks in sequence.

The sequential kernels have grid (batch, head, dv tile); each program walks the chunks of its (batch,
head) in order with its (dk, block_v) slice of the state in registers (kernels/gated_delta_pallas.py
explains the design; kernels/gated_delta_chunk.py is the chunk body). Blocks cover the whole padded
sequence of one head; chunks are read from them with pl.ds. Every loaded or computed array has
power-of-two dims (chunk, dk, block_v >= 16, per-position vectors as (chunk, 1) columns or (1, chunk)
rows), as Triton requires.

Interface (the TPU module has the same), layouts: q, k (b, Lp, h, dk); v, o (b, Lp, h, dv); vectors as
kernels/gated_delta_pallas._vectors makes them; states (b, h, dk, dv), entering states (b, nc, h, dk, dv).
  inverse(c, k, vec) -> T (b, h, Lp, chunk), the chunks' (I + A)^-1, by a parallel kernel
  fwd(c, q, k, v, vec, T, s0) -> o, final, s_in
  bwd(c, q, k, v, vec, T, s_in, do, dfinal) -> dq, dk, dv (float32), dbeta (b, h, Lp), dg (b, h, Lp), ds0
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from altbench.kernels.gated_delta_chunk import Chunk, chunk_bwd, chunk_fwd, chunk_inverse, make_mm
from altbench.kernels.pallas_common import f32, named_operands, refs_by_name, triton_params

_VEC_NAMES = ("hi", "lo", "hi_r", "lo_r", "beta", "beta_r")
_DOC_NAMES = ("doc", "doc_r", "ent")


def _call(kernel, c, grid, in_specs, out_specs, out_shape, name, args):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=triton_params(c.blocks.num_warps, c.blocks.num_stages),
      interpret=c.interpret, name=name)(*args)


def _chunk(rf, ci, c):
  """Chunk ci's inputs from the whole-sequence refs."""
  t = pl.ds(pl.multiple_of(ci * c.chunk, c.chunk), c.chunk)
  get = lambda n: (rf[n][:, t] if n.endswith("_r") else rf[n][t, :]) if n in rf else None
  return Chunk(q=get("q"), k=get("k"), v=get("v"), **{n: get(n) for n in _VEC_NAMES + _DOC_NAMES})


def _mm(rf):
  return make_mm(rf["k"].dtype, f32)


def _inverse_kernel(*refs, c, names):
  rf = refs_by_name(refs, names)
  get = lambda n: rf[n][...] if n in rf else None
  x = Chunk(q=None, k=rf["k"][...], v=None, **{n: get(n) for n in _VEC_NAMES + _DOC_NAMES})
  rf["T"][...] = chunk_inverse(x, _mm(rf))


def inverse(c, k, vec):
  """T = (I + A)^-1 of every chunk, (b, h, Lp, chunk) float32: grid (chunk, batch, head), all parallel."""
  b, lp, h, dk = k.shape
  C = c.chunk
  col = pl.BlockSpec((None, None, C, 1), lambda ci, bi, hi: (bi, hi, ci, 0))
  row = pl.BlockSpec((None, None, 1, C), lambda ci, bi, hi: (bi, hi, 0, ci))
  doc_col = pl.BlockSpec((None, C, 1), lambda ci, bi, hi: (bi, ci, 0))
  doc_row = pl.BlockSpec((None, 1, C), lambda ci, bi, hi: (bi, 0, ci))
  names, in_specs, args = named_operands(
      ("k", pl.BlockSpec((None, C, None, dk), lambda ci, bi, hi: (bi, ci, hi, 0)), k),
      *[(n, row if n.endswith("_r") else col, vec[n]) for n in _VEC_NAMES],
      *[(n, doc_row if n == "doc_r" else doc_col, vec.get(n)) for n in _DOC_NAMES])
  out_spec = pl.BlockSpec((None, None, C, C), lambda ci, bi, hi: (bi, hi, ci, 0))
  return _call(functools.partial(_inverse_kernel, c=c, names=names + ["T"]), c, (c.nc, b, h), in_specs, out_spec,
               jax.ShapeDtypeStruct((b, h, lp, C), f32), "altbench_gated_delta_inverse", args)


def _fwd_kernel(*refs, c, names):
  rf = refs_by_name(refs, names)
  mm = _mm(rf)
  state = rf["s0"][...] if "s0" in rf else jnp.zeros(rf["final"].shape, f32)

  def body(ci, state):
    rf["s_in"][ci] = state
    t = pl.ds(pl.multiple_of(ci * c.chunk, c.chunk), c.chunk)
    o, state = chunk_fwd(_chunk(rf, ci, c), state, rf["T"][t, :], mm, c.scale)
    rf["o"][t, :] = o.astype(rf["o"].dtype)
    return state

  rf["final"][...] = lax.fori_loop(0, c.nc, body, state)


def _bwd_kernel(*refs, c, names):
  rf = refs_by_name(refs, names)
  mm = _mm(rf)
  nc = c.nc

  def body(step, ds):
    ci = nc - 1 - step
    t = pl.ds(pl.multiple_of(ci * c.chunk, c.chunk), c.chunk)
    dq, dk, dv, dbeta, dg, ds = chunk_bwd(_chunk(rf, ci, c), rf["s_in"][ci], rf["T"][t, :], rf["do"][t, :], ds,
                                          mm, c.scale)
    rf["dq"][t, :] = dq
    rf["dk"][t, :] = dk
    rf["dv"][t, :] = dv.astype(rf["dv"].dtype)
    rf["dbeta"][t, :] = dbeta
    rf["dg"][:, t] = dg
    return ds

  rf["ds0"][...] = lax.fori_loop(0, nc, body, rf["dfinal"][...])


def _in_specs(c, q, k, v, vec, T, bv):
  """(names, specs, values) of the inputs both kernels read, over grid (batch, head, dv tile)."""
  b, lp, h, dk = q.shape
  seq = lambda w: pl.BlockSpec((None, lp, None, w), lambda bi, hi, vi: (bi, 0, hi, 0))
  col = pl.BlockSpec((None, None, lp, 1), lambda bi, hi, vi: (bi, hi, 0, 0))
  row = pl.BlockSpec((None, None, 1, lp), lambda bi, hi, vi: (bi, hi, 0, 0))
  doc_col = pl.BlockSpec((None, lp, 1), lambda bi, hi, vi: (bi, 0, 0))
  doc_row = pl.BlockSpec((None, 1, lp), lambda bi, hi, vi: (bi, 0, 0))
  vspec = pl.BlockSpec((None, lp, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi))
  ops = [("q", seq(dk), q), ("k", seq(dk), k), ("v", vspec, v)]
  ops += [(n, row if n.endswith("_r") else col, vec[n]) for n in _VEC_NAMES]
  ops += [(n, doc_row if n == "doc_r" else doc_col, vec.get(n)) for n in _DOC_NAMES]
  ops += [("T", pl.BlockSpec((None, None, lp, c.chunk), lambda bi, hi, vi: (bi, hi, 0, 0)), T)]
  return ops


def _state_spec(dk, bv):
  return pl.BlockSpec((None, None, dk, bv), lambda bi, hi, vi: (bi, hi, 0, vi))


def _s_in_spec(nc, dk, bv):
  return pl.BlockSpec((None, nc, None, dk, bv), lambda bi, hi, vi: (bi, 0, hi, 0, vi))


def fwd(c, q, k, v, vec, T, s0):
  b, lp, h, dk = q.shape
  dv = v.shape[-1]
  bv = c.blocks.block_v
  grid = (b, h, dv // bv)
  names, in_specs, args = named_operands(*_in_specs(c, q, k, v, vec, T, bv), ("s0", _state_spec(dk, bv), s0))
  out_names, out_specs, out_shape = named_operands(
      ("o", pl.BlockSpec((None, lp, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi)),
       jax.ShapeDtypeStruct(v.shape, v.dtype)),
      ("final", _state_spec(dk, bv), jax.ShapeDtypeStruct((b, h, dk, dv), f32)),
      ("s_in", _s_in_spec(c.nc, dk, bv), jax.ShapeDtypeStruct((b, c.nc, h, dk, dv), f32)))
  return _call(functools.partial(_fwd_kernel, c=c, names=names + out_names), c, grid, in_specs, out_specs,
               out_shape, "altbench_gated_delta_fwd", args)


def bwd(c, q, k, v, vec, T, s_in, do, dfinal):
  b, lp, h, dk = q.shape
  dv = v.shape[-1]
  bv = c.blocks.block_v
  nvt = dv // bv
  grid = (b, h, nvt)
  vspec = pl.BlockSpec((None, lp, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi))
  names, in_specs, args = named_operands(
      *_in_specs(c, q, k, v, vec, T, bv), ("s_in", _s_in_spec(c.nc, dk, bv), s_in), ("do", vspec, do),
      ("dfinal", _state_spec(dk, bv), dfinal))
  # dq, dk, dbeta and dg: one partial sum per dv tile (leading axis), added up below.
  part = lambda block, index: pl.BlockSpec((None,) + block, lambda bi, hi, vi: (vi,) + index(bi, hi))
  out_names, out_specs, out_shape = named_operands(
      ("dq", part((None, lp, None, dk), lambda bi, hi: (bi, 0, hi, 0)),
       jax.ShapeDtypeStruct((nvt, b, lp, h, dk), f32)),
      ("dk", part((None, lp, None, dk), lambda bi, hi: (bi, 0, hi, 0)),
       jax.ShapeDtypeStruct((nvt, b, lp, h, dk), f32)),
      ("dv", vspec, jax.ShapeDtypeStruct(v.shape, f32)),
      ("dbeta", part((None, None, lp, 1), lambda bi, hi: (bi, hi, 0, 0)),
       jax.ShapeDtypeStruct((nvt, b, h, lp, 1), f32)),
      ("dg", part((None, None, 1, lp), lambda bi, hi: (bi, hi, 0, 0)), jax.ShapeDtypeStruct((nvt, b, h, 1, lp), f32)),
      ("ds0", _state_spec(dk, bv), jax.ShapeDtypeStruct((b, h, dk, dv), f32)))
  dq, dk_, dv_, dbeta, dg, ds0 = _call(functools.partial(_bwd_kernel, c=c, names=names + out_names), c, grid,
                                       in_specs, out_specs, out_shape, "altbench_gated_delta_bwd", args)
  return (dq.sum(0), dk_.sum(0), dv_, dbeta.sum(0).reshape(b, h, lp), dg.sum(0).reshape(b, h, lp), ds0)
