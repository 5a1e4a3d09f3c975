"""The gated delta rule's TPU kernels: Pallas TPU (Mosaic): the chunks' (I + A)^-1 (grid (batch, head,
chunk), all parallel), then one forward and one backward kernel over the chunks in sequence.

The sequential kernels have grid (batch, head, chunk) with the chunk axis "arbitrary" (sequential; the
backward runs it in reverse through its index maps) and the (dk, dv) state, or its gradient, in VMEM
scratch; batch and head "parallel". One program is one whole chunk of one head (kernels/gated_delta_chunk.py
is its body), the whole dv. Layouts (b, h, Lp, d) so that blocks are (rows, lanes) tiles: the chunk length
is a multiple of 128 and dk, dv are zero-padded to multiples of 128 (the (8, 128) layout); per-position vectors come as
(1, chunk) lane rows (document ids as float32, exact for small integers), and the (chunk, 1) columns the
chunk body also uses are made in the kernel by an aligned float32 transpose, as kernels/ssd_pallas_tpu.py
does (no memory block has a last dim of 1). The one transposed matmul operand (a^T b) is transposed in
float32 first, as there.

``inverse``, ``fwd`` and ``bwd`` take and return the canonical (GPU) layouts of
kernels/gated_delta_pallas_gpu.py, so kernels/gated_delta_pallas.py drives both modules alike.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from altbench.kernels.gated_delta_chunk import Chunk, chunk_bwd, chunk_fwd, chunk_inverse, make_mm
from altbench.kernels.pallas_common import (LANES, dot, f32, named_operands, refs_by_name, tpu_interpret, tpu_params,
                                            tpu_vmem)

_ROW_NAMES = ("hi_r", "lo_r", "beta_r", "doc_r", "ent_r")


def _tn(a, b):
  """a^T b with a transposed in float32 (then cast back to b's dtype) and a plain matmul."""
  return dot(a.astype(f32).T.astype(b.dtype), b)


def _column(row):
  """(1, C) float32 row -> (C, 1) column, by an aligned (LANES, C) transpose (no (C, 1) memory blocks)."""
  return jnp.broadcast_to(row, (LANES, row.shape[-1])).T[:, :1]


def _row(col):
  """(C, 1) float32 column -> (1, C) row, the same way."""
  return jnp.broadcast_to(col, (col.shape[0], LANES)).T[:1, :]


def _chunk(rf):
  rows = {n[:-2]: rf[n][...].astype(f32) for n in _ROW_NAMES if n in rf}
  cols = {n: _column(r) for n, r in rows.items() if n != "ent"}
  docs = {}
  if "doc" in rows:  # document ids are small integers: exact in float32
    docs = dict(doc=cols["doc"], doc_r=rows["doc"], ent=_column(rows["ent"]))
  get = lambda n: rf[n][...] if n in rf else None
  return Chunk(q=get("q"), k=rf["k"][...], v=get("v"), beta=cols["beta"], beta_r=rows["beta"],
               hi=cols["hi"], lo=cols["lo"], hi_r=rows["hi"], lo_r=rows["lo"], **docs)


def _call(kernel, c, grid, in_specs, out_specs, out_shape, name, args, scratch=(), sequential=True):
  semantics = ("parallel", "parallel", "arbitrary" if sequential else "parallel")
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=list(scratch), compiler_params=tpu_params(semantics),
      interpret=tpu_interpret(c.interpret), name=name)(*args)


def _mm(rf):
  return make_mm(rf["k"].dtype, f32, _tn)


def _inverse_kernel(*refs, names):
  rf = refs_by_name(refs, names)
  rf["T"][...] = chunk_inverse(_chunk(rf), _mm(rf))


def _fwd_kernel(*refs, c, names):
  rf = refs_by_name(refs, names)
  ci = pl.program_id(2)

  @pl.when(ci == 0)
  def _():
    rf["st"][...] = rf["s0"][...] if "s0" in rf else jnp.zeros(rf["st"].shape, f32)

  state = rf["st"][...]
  rf["s_in"][...] = state
  o, state = chunk_fwd(_chunk(rf), state, rf["T"][...], _mm(rf), c.scale)
  rf["o"][...] = o.astype(rf["o"].dtype)
  rf["st"][...] = state

  @pl.when(ci == c.nc - 1)
  def _():
    rf["final"][...] = state


def _bwd_kernel(*refs, c, names):
  rf = refs_by_name(refs, names)
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    rf["dst"][...] = rf["dfinal"][...]

  dq, dk, dv, dbeta, dg, ds = chunk_bwd(_chunk(rf), rf["s_in"][...], rf["T"][...], rf["do"][...], rf["dst"][...],
                                        _mm(rf), c.scale)
  rf["dq"][...] = dq
  rf["dk"][...] = dk
  rf["dv"][...] = dv
  rf["dbeta"][...] = _row(dbeta)
  rf["dg"][...] = dg
  rf["dst"][...] = ds

  @pl.when(step == c.nc - 1)
  def _():
    rf["ds0"][...] = ds


def _specs(c, dk, dv, reverse):
  """BlockSpecs over grid (batch, head, step); step is the chunk, or the chunk counted from the end."""
  C, nc = c.chunk, c.nc
  ci = (lambda s: nc - 1 - s) if reverse else (lambda s: s)
  tile = lambda w: pl.BlockSpec((None, None, C, w), lambda bi, hi, s: (bi, hi, ci(s), 0))
  return dict(
      qk=tile(dk), v=tile(dv), T=tile(C),
      row=pl.BlockSpec((None, None, 1, C), lambda bi, hi, s: (bi, hi, 0, ci(s))),
      doc_row=pl.BlockSpec((None, 1, C), lambda bi, hi, s: (bi, 0, ci(s))),
      state=pl.BlockSpec((None, None, dk, dv), lambda bi, hi, s: (bi, hi, 0, 0)),
      s_in=pl.BlockSpec((None, None, None, dk, dv), lambda bi, hi, s: (bi, ci(s), hi, 0, 0)))


def _inputs(sp, q, k, v, vec, T):
  ops = [("q", sp["qk"], q), ("k", sp["qk"], k), ("v", sp["v"], v)]
  ops += [(n, sp["doc_row"] if n in ("doc_r", "ent_r") else sp["row"], vec.get(n)) for n in _ROW_NAMES]
  return ops + [("T", sp["T"], T)]


def inverse(c, k, vec):
  """T = (I + A)^-1 of every chunk, (b, h, Lp, chunk) float32: grid (batch, head, chunk), all parallel."""
  b, lp, h, dk = k.shape
  sp = _specs(c, dk, 0, reverse=False)
  names, in_specs, args = named_operands(*_inputs(sp, None, _heads(k), None, vec, None))
  return _call(functools.partial(_inverse_kernel, names=names + ["T"]), c, (b, h, c.nc), in_specs, sp["T"],
               jax.ShapeDtypeStruct((b, h, lp, c.chunk), f32), "altbench_gated_delta_inverse_tpu", args,
               sequential=False)


def _heads(a):     # (b, Lp, h, w) <-> (b, h, Lp, w)
  return jnp.swapaxes(a, 1, 2)


def fwd(c, q, k, v, vec, T, s0):
  b, lp, h, dk = q.shape
  dv = v.shape[-1]
  sp = _specs(c, dk, dv, reverse=False)
  names, in_specs, args = named_operands(*_inputs(sp, _heads(q), _heads(k), _heads(v), vec, T),
                                         ("s0", sp["state"], s0))
  out_names, out_specs, out_shape = named_operands(
      ("o", sp["v"], jax.ShapeDtypeStruct((b, h, lp, dv), v.dtype)),
      ("final", sp["state"], jax.ShapeDtypeStruct((b, h, dk, dv), f32)),
      ("s_in", sp["s_in"], jax.ShapeDtypeStruct((b, c.nc, h, dk, dv), f32)))
  o, final, s_in = _call(functools.partial(_fwd_kernel, c=c, names=names + out_names + ["st"]), c,
                         (b, h, c.nc), in_specs, out_specs, out_shape, "altbench_gated_delta_fwd_tpu", args,
                         [tpu_vmem((dk, dv), f32)])
  return _heads(o), final, s_in


def bwd(c, q, k, v, vec, T, s_in, do, dfinal):
  b, lp, h, dk = q.shape
  dv = v.shape[-1]
  sp = _specs(c, dk, dv, reverse=True)
  names, in_specs, args = named_operands(
      *_inputs(sp, _heads(q), _heads(k), _heads(v), vec, T), ("s_in", sp["s_in"], s_in), ("do", sp["v"], _heads(do)),
      ("dfinal", sp["state"], dfinal))
  out_names, out_specs, out_shape = named_operands(
      ("dq", sp["qk"], jax.ShapeDtypeStruct((b, h, lp, dk), f32)),
      ("dk", sp["qk"], jax.ShapeDtypeStruct((b, h, lp, dk), f32)),
      ("dv", sp["v"], jax.ShapeDtypeStruct((b, h, lp, dv), f32)),
      ("dbeta", sp["row"], jax.ShapeDtypeStruct((b, h, 1, lp), f32)),
      ("dg", sp["row"], jax.ShapeDtypeStruct((b, h, 1, lp), f32)),
      ("ds0", sp["state"], jax.ShapeDtypeStruct((b, h, dk, dv), f32)))
  dq, dk_, dv_, dbeta, dg, ds0 = _call(
      functools.partial(_bwd_kernel, c=c, names=names + out_names + ["dst"]), c, (b, h, c.nc), in_specs,
      out_specs, out_shape, "altbench_gated_delta_bwd_tpu", args, [tpu_vmem((dk, dv), f32)])
  return _heads(dq), _heads(dk_), _heads(dv_), dbeta.reshape(b, h, lp), dg.reshape(b, h, lp), ds0
