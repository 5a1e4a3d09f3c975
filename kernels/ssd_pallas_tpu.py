"""The SSD's TPU kernels: Pallas TPU (Mosaic) (chunk states, state passing, chunk scan, backward).

Whole chunks per program (Q x Q float32 tiles fit VMEM easily); layouts (b, h, L, p) / (b, g, L, n)
so blocks are (rows, lanes) tiles; per-position vectors are (1, Q) lane rows; their column forms come
from an aligned float32 transpose in the kernel, so the chunk length is rounded up to a multiple of
128 and headdim / dstate are zero-padded to multiples of 128 (the (8, 128) layout). Grids set
``dimension_semantics``: batch / chunk / group "parallel", the head-in-group axis "arbitrary" (it
accumulates dB, dC and reuses C B^T in VMEM scratch), the chunk axis of the state passing
"arbitrary".

``outer``, ``state_pass``, ``scan_fwd`` and ``bwd`` at the end take and return the canonical (GPU)
layouts of kernels/ssd_pallas_gpu.py, so kernels/ssd_pallas.py drives both modules alike.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from altbench.kernels.pallas_common import (LANES, decay_tile, dot, f32, idiv, named_operands, refs_by_name,
                                            store_scan_output, tpu_interpret, tpu_params, tpu_vmem)

# --------------------------------------------------------------------------------------------
# Kernels. Layouts: x, z, du (b, h, Lp, p); B, C (b, g, Lp, n); vectors (b, h, nc, 1, Q) lane rows;
# doc ids (b, nc, 1, Q); states (b, nc, h, p, n); p, n, Q multiples of 128. Column forms of vectors
# come from an aligned float32 transpose.


def _tile(x, width):
  """(rows, 128) -> (rows, width) for width a multiple of 128."""
  return x if width == LANES else jnp.tile(x, (1, width // LANES))


def _col(row, width):
  """(1, Q) row vector v -> (Q, width) matrix with [i, :] = v_i."""
  q = row.shape[-1]
  return _tile(jnp.broadcast_to(row.astype(f32), (LANES, q)).T, width)


def _rowsum(m):
  """Row sums of a (R, K) float32 matrix as a (1, R) row (sublane reduction of the transpose)."""
  return jnp.sum(m.T, axis=0, keepdims=True)


def _intra_ddA(gm):
  """The sums T_k = sum_{i > k} sum_{j <= k} gm_ij of _intra_ddA (kernels/ssd_pallas.py) on a whole
  (Q, Q) chunk.

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


def _dot_tn(a, b):
  """a.T @ b: a (float32) is transposed in float32 (as jax's own TPU kernels do), then cast to b's
  dtype for the matmul."""
  return dot(a.astype(f32).T.astype(b.dtype), b)


def _decay(rf, has_doc):
  """(Q, Q) masked decay matrix of one chunk and head: rows i, columns j."""
  hi, lo = rf["hi"][...], rf["lo"][...]
  q = hi.shape[-1]
  keep = lax.broadcasted_iota(jnp.int32, (q, q), 0) >= lax.broadcasted_iota(jnp.int32, (q, q), 1)
  if has_doc:
    doc = rf["doc"][...].astype(f32)
    keep = keep & (_col(doc, q) == doc)
  return decay_tile(_col(hi, q), _col(lo, q), hi, lo, keep)


def _call(kernel, c, grid, in_specs, out_specs, out_shape, semantics, name, args, scratch=()):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=list(scratch), compiler_params=tpu_params(semantics),
      interpret=tpu_interpret(c.interpret), name=name)(*args)


def _outer_kernel(u_ref, v_ref, w_ref, o_ref):
  v = v_ref[...]
  wv = (v.astype(f32) * _col(w_ref[...], v.shape[-1])).astype(v.dtype)
  o_ref[...] = _dot_tn(u_ref[...], wv)      # (p, Q) @ (Q, n)


def _outer(c, u, v, w):
  """u (b, h, Lp, p), v (b, g, Lp, n), w (b, h, nc, 1, Q) -> (b, nc, h, p, n)."""
  b, h, lp, pp = u.shape
  nn = v.shape[-1]
  q, r = c.q, c.r
  return _call(
      _outer_kernel, c, (b, h, c.nc),
      [pl.BlockSpec((None, None, q, pp), lambda bi, hi, ci: (bi, hi, ci, 0)),
       pl.BlockSpec((None, None, q, nn), lambda bi, hi, ci: (bi, idiv(hi, r), ci, 0)),
       pl.BlockSpec((None, None, None, 1, q), lambda bi, hi, ci: (bi, hi, ci, 0, 0))],
      pl.BlockSpec((None, None, None, pp, nn), lambda bi, hi, ci: (bi, ci, hi, 0, 0)),
      jax.ShapeDtypeStruct((b, c.nc, h, pp, nn), f32), ("parallel", "parallel", "parallel"),
      "altbench_ssd_chunk_outer_tpu", (u, v, w))


def _pass_kernel(*refs, c, names):
  rf = refs_by_name(refs, names)
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


def state_pass(c, s, gamma, init, reverse=False, hf=None):
  b, nc, h, pp, nn = s.shape
  ci = (lambda k: nc - 1 - k) if reverse else (lambda k: k)
  state_spec = pl.BlockSpec((None, None, None, pp, nn), lambda bi, hi, k: (bi, ci(k), hi, 0, 0))
  one_spec = pl.BlockSpec((None, None, pp, nn), lambda bi, hi, k: (bi, hi, 0, 0))
  rows_spec = lambda w: pl.BlockSpec((None, None, None, 1, w), lambda bi, hi, k: (bi, hi, ci(k), 0, 0))
  gamma_rows = jnp.broadcast_to(gamma[..., None, None], (b, h, nc, 1, nn))
  names, in_specs, args = named_operands(("s", state_spec, s), ("gamma", rows_spec(nn), gamma_rows),
                                         ("init", one_spec, init), ("hf", state_spec, hf))
  out_names, out_specs, out_shape = named_operands(
      ("hin", state_spec, jax.ShapeDtypeStruct(s.shape, f32)),
      ("final", one_spec, jax.ShapeDtypeStruct((b, h, pp, nn), f32)),
      ("dgamma", rows_spec(LANES), None if hf is None else jax.ShapeDtypeStruct((b, h, nc, 1, LANES), f32)))
  outs = _call(functools.partial(_pass_kernel, c=c, names=names + out_names + ["st"]), c, (b, h, nc),
               in_specs, out_specs, out_shape, ("parallel", "parallel", "arbitrary"),
               "altbench_ssd_state_pass_tpu" + ("_bwd" if reverse else ""), args, [tpu_vmem((pp, nn), f32)])
  return outs[0], outs[1], (outs[2][..., 0, 0] if hf is not None else None)


def _specs(c, pp, nn):
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


def _scan_fwd_kernel(*refs, c, names):
  rf = refs_by_name(refs, names)

  @pl.when(pl.program_id(3) == 0)  # C B^T is shared by the heads of a group
  def _():
    rf["cb"][...] = dot(rf["C"][...], rf["B"][...], "nt")

  x = rf["x"][...]
  cmat = rf["C"][...]
  pp = x.shape[-1]
  m = rf["cb"][...] * _decay(rf, c.has_doc) * rf["dt"][...]
  y = dot(m.astype(x.dtype), x)
  y = y + _col(rf["e"][...], pp) * dot(cmat, rf["H"][...].astype(cmat.dtype), "nt")
  if c.has_D:
    y = y + rf["D"][...] * x.astype(f32)
  store_scan_output(rf, y)


def _scan_fwd(c, x, B, C, v, doc, H, D, z):
  b, h, lp, pp = x.shape
  g, nn = B.shape[1], B.shape[-1]
  sp = _specs(c, pp, nn)
  names, in_specs, args = named_operands(
      ("C", sp["group_tile"], C), ("B", sp["group_tile"], B), ("x", sp["head_tile"], x),
      *[(k, sp["vec"], v[k]) for k in ("dt", "hi", "lo", "e")], ("doc", sp["doc"], doc),
      ("H", sp["state"], H), ("D", sp["D"], D), ("z", sp["head_tile"], z))
  y_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
  out_names, out_specs, out_shape = named_operands(("out", sp["head_tile"], y_shape),
                                                   ("u", sp["head_tile"], y_shape if c.has_z else None))
  outs = _call(functools.partial(_scan_fwd_kernel, c=c, names=names + out_names + ["cb"]), c,
               (b, c.nc, g, c.r), in_specs, out_specs, out_shape,
               ("parallel", "parallel", "parallel", "arbitrary"), "altbench_ssd_chunk_scan_tpu", args,
               [tpu_vmem((c.q, c.q), f32)])
  return outs[0], (outs[1] if c.has_z else None)


def _bwd_kernel(*refs, c, names):
  rf = refs_by_name(refs, names)
  ri = pl.program_id(3)
  cmat, bmat = rf["C"][...], rf["B"][...]

  @pl.when(ri == 0)
  def _():
    rf["cb"][...] = dot(cmat, bmat, "nt")
    rf["dB_acc"][...] = jnp.zeros(rf["dB_acc"].shape, f32)
    rf["dC_acc"][...] = jnp.zeros(rf["dC_acc"].shape, f32)

  x, du = rf["x"][...], rf["du"][...]
  dtype = x.dtype
  pp, nn = x.shape[-1], bmat.shape[-1]
  dt, l, e = rf["dt"][...], rf["l"][...], rf["e"][...]
  cb = rf["cb"][...]
  lm = _decay(rf, c.has_doc)
  p = cb * lm
  dmp = dot(du, x, "nt")                                      # [i, j] = du_i . x_j
  px = _dot_tn(p, du)                                         # [j] = sum_i P_ij du_i
  ddt_intra = jnp.sum(p * dmp, axis=0, keepdims=True)
  dcb = dmp * lm * dt
  rf["tcs"][...] = _intra_ddA(dcb * cb)
  dC = dot(dcb.astype(dtype), bmat)
  dB = _dot_tn(dcb, cmat)
  # Chunk-state term (see the GPU column kernel).
  ds = rf["dS"][...].astype(dtype)
  bds = dot(bmat, ds, "nt")                                   # (Q, p)
  w = dt * l
  dB = dB + _col(w, nn) * dot(x, ds)
  ddt_state = l * _rowsum(x.astype(f32) * bds)
  dx = _col(dt, pp) * px + _col(w, pp) * bds
  if c.has_D:
    dx = dx + rf["D"][...] * du.astype(f32)
  # Entering-state term (see the GPU row kernel).
  dho = dot(du, rf["H"][...].astype(dtype))                   # (Q, n)
  dC = dC + _col(e, nn) * dho
  dhead = e * _rowsum(cmat.astype(f32) * dho)
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


def _bwd(c, x, B, C, du, v, doc, H, dS, D):
  b, h, lp, pp = x.shape
  g, nn = B.shape[1], B.shape[-1]
  q = c.q
  sp = _specs(c, pp, nn)
  names, in_specs, args = named_operands(
      ("C", sp["group_tile"], C), ("B", sp["group_tile"], B), ("x", sp["head_tile"], x),
      ("du", sp["head_tile"], du), *[(k, sp["vec"], v[k]) for k in ("dt", "hi", "lo", "e", "l")],
      ("doc", sp["doc"], doc), ("H", sp["state"], H), ("dS", sp["state"], dS), ("D", sp["D"], D))
  names += ["dx", "dB", "dC", "ddt_intra", "ddt_state", "dhead", "tcs", "cb", "dB_acc", "dC_acc"]
  vec_shape = jax.ShapeDtypeStruct((b, h, c.nc, 1, q), f32)
  outs = _call(
      functools.partial(_bwd_kernel, c=c, names=names), c, (b, c.nc, g, c.r), in_specs,
      [sp["head_tile"], sp["group_tile"], sp["group_tile"]] + [sp["vec"]] * 4,
      [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, g, lp, nn), f32),
       jax.ShapeDtypeStruct((b, g, lp, nn), f32)] + [vec_shape] * 4,
      ("parallel", "parallel", "parallel", "arbitrary"), "altbench_ssd_bwd_tpu", args,
      [tpu_vmem((q, q), f32), tpu_vmem((q, nn), f32), tpu_vmem((q, nn), f32)])
  return outs


# --------------------------------------------------------------------------------------------
# The canonical (GPU-layout) interface over the kernels above


def _heads(a):     # (b, Lp, h, w) <-> (b, h, Lp, w)
  return jnp.swapaxes(a, 1, 2)


def _rows(c, a):    # (b, h, Lp) -> (b, h, nc, 1, Q)
  return a.reshape(a.shape[0], a.shape[1], c.nc, 1, c.q)


def outer(c, u, v, w):
  return _outer(c, _heads(u), _heads(v), _rows(c, w))


def scan_fwd(c, x, B, C, v, doc, H, D, z):
  t, rows = _heads, functools.partial(_rows, c)
  vr = {k: rows(v[k]) for k in ("dt", "hi", "lo", "e")}
  doc_r = None if doc is None else doc.reshape(doc.shape[0], c.nc, 1, c.q)
  D_r = None if D is None else D[:, None, :]
  out, u = _scan_fwd(c, t(x), t(B), t(C), vr, doc_r, H, D_r, None if z is None else t(z))
  return t(out), (None if u is None else t(u))


def bwd(c, x, B, C, du, v, doc, H, dS, D):
  t, rows = _heads, functools.partial(_rows, c)
  vr = {k: rows(v[k]) for k in ("dt", "hi", "lo", "e", "l")}
  doc_r = None if doc is None else doc.reshape(doc.shape[0], c.nc, 1, c.q)
  D_r = None if D is None else D[:, None, :]
  dx, dB, dC, *vecs = _bwd(c, t(x), t(B), t(C), t(du), vr, doc_r, H, dS, D_r)
  flat = lambda a: a.reshape(a.shape[0], a.shape[1], -1)
  return (t(dx), t(dB), t(dC), *map(flat, vecs))
