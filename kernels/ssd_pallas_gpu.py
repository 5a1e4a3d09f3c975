"""The SSD's GPU kernels: Pallas on the Triton backend (chunk states, state passing, chunk scan,
and the backward's row and column kernels).

Triton for the reasons given in kernels/flash_attention_gpu.py: it runs on every NVIDIA GPU from
Ampere (sm80) on, while Mosaic GPU is Hopper/Blackwell-only and far more intricate. Layout
(b, L, h, p) untouched. Grids over (chunk x row tile, batch, head); tiles (``block_m`` rows x
``block_k`` columns of the chunk) are powers of two; headdim and dstate are zero-padded to powers of
two (>= 16, the smallest Triton dot), the chunk length is rounded up to a power of two.

These are the canonical-layout kernels of the interface kernels/ssd_pallas.py drives (the TPU module
has the same): ``outer``, ``state_pass``, ``scan_fwd``, ``bwd``; ``c`` is ssd_pallas._Cfg. Layouts:
x, z, du (b, Lp, h, p); B, C (b, Lp, g, n); vectors (b, h, Lp); states (b, nc, h, p, n); doc ids
(b, Lp) int32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from altbench.kernels.pallas_common import (cdiv, decay_tile, dot, f32, fori, idiv, named_operands,
                                            pow2_at_least, refs_by_name, store_scan_output, triton_params)


def _call(kernel, c, grid, in_specs, out_specs, out_shape, name, args):
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=triton_params(c.blocks.num_warps, c.blocks.num_stages),
      interpret=c.interpret, name=name)(*args)


def _outer_kernel(u_ref, v_ref, w_ref, o_ref, *, c):
  """o = sum_j w_j u_j v_j^T over the chunk: (p, n)."""
  bk = c.blocks.block_k

  def body(kb, acc):
    ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    v = v_ref[ks, :]
    wv = (v.astype(f32) * w_ref[ks][:, None]).astype(v.dtype)
    return acc + dot(u_ref[ks, :], wv, "tn")

  acc = jnp.zeros(o_ref.shape, f32)
  o_ref[...] = fori(0, c.q // bk, body, acc)


def outer(c, u, v, w):
  b, lp, h, pp = u.shape
  nn = v.shape[-1]
  q, r = c.q, c.r
  return _call(
      functools.partial(_outer_kernel, c=c), c, (c.nc, b, h),
      [pl.BlockSpec((None, q, None, pp), lambda ci, bi, hi: (bi, ci, hi, 0)),
       pl.BlockSpec((None, q, None, nn), lambda ci, bi, hi: (bi, ci, idiv(hi, r), 0)),
       pl.BlockSpec((None, None, q), lambda ci, bi, hi: (bi, hi, ci))],
      pl.BlockSpec((None, None, None, pp, nn), lambda ci, bi, hi: (bi, ci, hi, 0, 0)),
      jax.ShapeDtypeStruct((b, c.nc, h, pp, nn), f32), "altbench_ssd_chunk_outer", (u, v, w))


def _pass_kernel(*refs, c, names, reverse):
  rf = refs_by_name(refs, names)
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


def state_pass(c, s, gamma, init, reverse=False, hf=None):
  """States entering each chunk (in the direction of travel) and the last state.

  Forward: hin_c = state before chunk c, state <- gamma_c state + s_c. Reverse (the backward of
  the forward): chunks last to first; with hf (the forward's entering states) it also returns
  d gamma_c = <hin_c, hf_c> (here hin_c is the gradient w.r.t. the state leaving chunk c).
  """
  b, nc, h, pp, nn = s.shape
  bp = c.blocks.block_p
  npb = pp // bp
  # d gamma is accumulated as a vector in registers and stored once: padded to a power of two.
  ncp = pow2_at_least(nc)
  state_spec = pl.BlockSpec((None, nc, None, bp, nn), lambda bi, hi, pb: (bi, 0, hi, pb, 0))
  one_spec = pl.BlockSpec((None, None, bp, nn), lambda bi, hi, pb: (bi, hi, pb, 0))
  names, in_specs, args = named_operands(
      ("s", state_spec, s), ("gamma", pl.BlockSpec((None, None, nc), lambda bi, hi, pb: (bi, hi, 0)), gamma),
      ("init", one_spec, init), ("hf", state_spec, hf))
  out_names, out_specs, out_shape = named_operands(
      ("hin", state_spec, jax.ShapeDtypeStruct(s.shape, f32)),
      ("final", one_spec, jax.ShapeDtypeStruct((b, h, pp, nn), f32)),
      ("dgamma", pl.BlockSpec((None, None, None, ncp), lambda bi, hi, pb: (bi, hi, pb, 0)),
       None if hf is None else jax.ShapeDtypeStruct((b, h, npb, ncp), f32)))
  outs = _call(functools.partial(_pass_kernel, c=c, names=names + out_names, reverse=reverse), c,
               (b, h, npb), in_specs, out_specs, out_shape,
               "altbench_ssd_state_pass" + ("_bwd" if reverse else ""), args)
  if hf is None:
    return outs[0], outs[1], None
  return outs[0], outs[1], outs[2][..., :nc].sum(2)


def _row_loops(i0, bm, bk, masked_all):
  """[(start, stop, masked)] over j tiles for output rows [i0, i0 + bm): tiles at or left of the
  diagonal only; the causal mask only where a tile crosses it (or everywhere, with documents)."""
  stop = cdiv(i0 + bm, bk)
  if masked_all:
    return [(0, stop, True)]
  full = jnp.minimum(idiv(i0 + 1, bk), stop)
  return [(0, full, False), (full, stop, True)]


def _col_loops(j0, bm, bk, nbi, masked_all):
  """[(start, stop, masked)] over i tiles for input rows [j0, j0 + bk)."""
  first = idiv(j0, bm)
  if masked_all:
    return [(first, nbi, True)]
  clear = jnp.minimum(cdiv(j0 + bk - 1, bm), nbi)
  return [(first, clear, True), (clear, nbi, False)]


def _own_tile(c, size):
  """This program's tile of `size` positions of its chunk (grid axis 0 runs over chunk x tile): its
  first position and its slice."""
  start = lax.rem(pl.program_id(0), np.int32(c.q // size)) * size
  return start, pl.ds(pl.multiple_of(start, size), size)


def _keep(i_idx, j_idx, d_i, d_j, masked):
  if not masked:
    return None
  keep = i_idx >= j_idx
  if d_i is not None:
    keep = keep & (d_i == d_j)
  return keep


def _scan_fwd_kernel(*refs, c, names):
  rf = refs_by_name(refs, names)
  bm, bk = c.blocks.block_m, c.blocks.block_k
  i0, rows = _own_tile(c, bm)
  ci = rf["C"][...]
  dtype = rf["x"].dtype
  hi_i, lo_i = rf["hi"][rows][:, None], rf["lo"][rows][:, None]
  d_i = rf["doc"][rows][:, None] if c.has_doc else None
  i_idx = (i0 + jnp.arange(bm))[:, None]
  # Entering state: e_i * C_i . H (state cast to the operand dtype, as for every matmul).
  acc = rf["e"][...][:, None] * dot(ci, rf["H"][...].astype(ci.dtype), "nt")

  def body(jb, acc, masked):
    js = pl.ds(pl.multiple_of(jb * bk, bk), bk)
    s = dot(ci, rf["B"][js, :], "nt")
    keep = _keep(i_idx, (jb * bk + jnp.arange(bk))[None, :], d_i,
                 rf["doc"][js][None, :] if c.has_doc else None, masked)
    lm = decay_tile(hi_i, lo_i, rf["hi"][js][None, :], rf["lo"][js][None, :], keep)
    m = s * lm * rf["dt"][js][None, :]
    return acc + dot(m.astype(dtype), rf["x"][js, :])

  for lo, hi, masked in _row_loops(i0, bm, bk, c.has_doc):
    acc = fori(lo, hi, functools.partial(body, masked=masked), acc)
  y = acc
  if c.has_D:
    y = y + rf["D"][...][None, :] * rf["x"][rows, :].astype(f32)
  store_scan_output(rf, y)


def scan_fwd(c, x, B, C, v, doc, H, D, z):
  b, lp, h, pp = x.shape
  nn = B.shape[-1]
  q, r, bm = c.q, c.r, c.blocks.block_m
  nbi = q // bm
  chunk = lambda i: idiv(i, nbi)
  row = lambda w: pl.BlockSpec((None, bm, None, w), lambda i, bi, hi: (bi, i, hi, 0))
  vec = pl.BlockSpec((None, None, q), lambda i, bi, hi: (bi, hi, chunk(i)))
  names, in_specs, args = named_operands(
      ("C", pl.BlockSpec((None, bm, None, nn), lambda i, bi, hi: (bi, i, idiv(hi, r), 0)), C),
      ("B", pl.BlockSpec((None, q, None, nn), lambda i, bi, hi: (bi, chunk(i), idiv(hi, r), 0)), B),
      ("x", pl.BlockSpec((None, q, None, pp), lambda i, bi, hi: (bi, chunk(i), hi, 0)), x),
      ("dt", vec, v["dt"]), ("hi", vec, v["hi"]), ("lo", vec, v["lo"]),
      ("e", pl.BlockSpec((None, None, bm), lambda i, bi, hi: (bi, hi, i)), v["e"]),
      ("doc", pl.BlockSpec((None, q), lambda i, bi, hi: (bi, chunk(i))), doc),
      ("H", pl.BlockSpec((None, None, None, pp, nn), lambda i, bi, hi: (bi, chunk(i), hi, 0, 0)), H),
      ("D", pl.BlockSpec((None, pp), lambda i, bi, hi: (hi, 0)), D), ("z", row(pp), z))
  y_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
  out_names, out_specs, out_shape = named_operands(("out", row(pp), y_shape),
                                                   ("u", row(pp), y_shape if c.has_z else None))
  outs = _call(functools.partial(_scan_fwd_kernel, c=c, names=names + out_names), c, (c.nc * nbi, b, h),
               in_specs, out_specs, out_shape, "altbench_ssd_chunk_scan", args)
  return outs[0], (outs[1] if c.has_z else None)


def _bwd_row_kernel(*refs, c, names):
  """Output rows i: dC_i (summed over this program's heads), the entering-state part of d cs_i, and
  this row tile's share of the intra-chunk d dA (see _intra_ddA in kernels/ssd_pallas.py)."""
  rf = refs_by_name(refs, names)
  bm, bk, hp = c.blocks.block_m, c.blocks.block_k, c.blocks.heads
  i0, rows = _own_tile(c, bm)
  ci = rf["C"][...]
  dtype = rf["x"].dtype
  d_i = rf["doc"][rows][:, None] if c.has_doc else None
  i_idx = (i0 + jnp.arange(bm))[:, None]

  def head(t, dC):
    du = rf["du"][:, t, :]
    hi_i, lo_i = rf["hi"][t, rows][:, None], rf["lo"][t, rows][:, None]
    e_i = rf["e"][t, rows]
    # Entering-state term y_i += e_i C_i . H: dC_i += e_i du_i H, d e_i = C_i . (du_i H).
    dho = dot(du, rf["H"][t].astype(dtype))
    dC = dC + e_i[:, None] * dho
    rf["dhead"][t, :] = e_i * jnp.sum(ci.astype(f32) * dho, axis=1)

    def body(jb, carry, masked):
      dC, run = carry
      js = pl.ds(pl.multiple_of(jb * bk, bk), bk)
      bj = rf["B"][js, :]
      s = dot(ci, bj, "nt")
      k_idx = (jb * bk + jnp.arange(bk))[None, :]
      keep = _keep(i_idx, k_idx, d_i, rf["doc"][js][None, :] if c.has_doc else None, masked)
      lm = decay_tile(hi_i, lo_i, rf["hi"][t, js][None, :], rf["lo"][t, js][None, :], keep)
      dmp = dot(du, rf["x"][js, t, :], "nt")                  # du_i . x_j
      dcb = dmp * lm * rf["dt"][t, js][None, :]               # d(C_i . B_j)
      gm = dcb * s                                            # d(cs_i - cs_j) of pair (i, j)
      # Inclusive prefix over j (all earlier tiles in `run`), summed over rows i > k.
      prefix = run[:, None] + jnp.cumsum(gm, axis=1)
      rf["tcs"][t, js] = jnp.sum(jnp.where(i_idx > k_idx, prefix, 0.0), axis=0)
      return dC + dot(dcb.astype(dtype), bj), run + jnp.sum(gm, axis=1)

    carry = (dC, jnp.zeros((bm,), f32))
    for lo, hi, masked in _row_loops(i0, bm, bk, c.has_doc):
      carry = fori(lo, hi, functools.partial(body, masked=masked), carry)

    def zero_fill(jb, carry):  # tiles right of the diagonal: no pair (i, j) with j <= i
      rf["tcs"][t, pl.ds(pl.multiple_of(jb * bk, bk), bk)] = jnp.zeros((bk,), f32)
      return carry

    fori(cdiv(i0 + bm, bk), c.q // bk, zero_fill, jnp.int32(0))
    return carry[0]

  dC = jnp.zeros((bm, ci.shape[-1]), f32)
  dC = head(0, dC) if hp == 1 else lax.fori_loop(0, hp, head, dC)
  rf["dC"][...] = dC


def _bwd_col_kernel(*refs, c, names):
  """Input rows j: dx_j, d dt_j (intra and state parts), dB_j (summed over this program's heads)."""
  rf = refs_by_name(refs, names)
  bm, bk, hp = c.blocks.block_m, c.blocks.block_k, c.blocks.heads
  j0, cols = _own_tile(c, bk)
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
    bds = dot(bj, ds, "nt")                                   # (bk, p)
    dB = dB + w_j[:, None] * dot(xj, ds)
    ddt_state = l_j * jnp.sum(xj.astype(f32) * bds, axis=1)

    def body(ib, carry, masked):
      px, ddt, dB = carry
      is_ = pl.ds(pl.multiple_of(ib * bm, bm), bm)
      ci = rf["C"][is_, :]
      du = rf["du"][is_, t, :]
      s = dot(ci, bj, "nt")                                   # (bm, bk)
      keep = _keep((ib * bm + jnp.arange(bm))[:, None], j_idx,
                   rf["doc"][is_][:, None] if c.has_doc else None, d_j, masked)
      lm = decay_tile(rf["hi"][t, is_][:, None], rf["lo"][t, is_][:, None], hi_j, lo_j, keep)
      p = s * lm
      dmp = dot(du, xj, "nt")                                 # du_i . x_j
      px = px + dot(p.astype(dtype), du, "tn")                # sum_i P_ij du_i
      ddt = ddt + jnp.sum(p * dmp, axis=0)
      dcb = dmp * lm * dt_j[None, :]
      return px, ddt, dB + dot(dcb.astype(dtype), ci, "tn")

    carry = (jnp.zeros(xj.shape, f32), jnp.zeros((bk,), f32), dB)
    for lo, hi, masked in _col_loops(j0, bm, bk, c.q // bm, c.has_doc):
      carry = fori(lo, hi, functools.partial(body, masked=masked), carry)
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


def bwd(c, x, B, C, du, v, doc, H, dS, D):
  b, lp, h, pp = x.shape
  g, nn = B.shape[2], B.shape[-1]
  q, r = c.q, c.r
  bm, bk, hp = c.blocks.block_m, c.blocks.block_k, c.blocks.heads
  nhb = h // hp
  grp = lambda hb: idiv(hb * hp, r)

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
  chunk = lambda i: idiv(i, nbi)
  names, specs, args = common(chunk, ["dt", "hi", "lo", "e"])
  names = ["C", "B", "x", "du"] + names + ["H", "dC", "dhead", "tcs"]
  specs = [pl.BlockSpec((None, bm, None, nn), lambda i, bi, hb: (bi, i, grp(hb), 0)),
           pl.BlockSpec((None, q, None, nn), lambda i, bi, hb: (bi, chunk(i), grp(hb), 0)),
           pl.BlockSpec((None, q, hp, pp), lambda i, bi, hb: (bi, chunk(i), hb, 0)),
           pl.BlockSpec((None, bm, hp, pp), lambda i, bi, hb: (bi, i, hb, 0))] + specs + [
               pl.BlockSpec((None, None, hp, pp, nn), lambda i, bi, hb: (bi, chunk(i), hb, 0, 0))]
  args = [C, B, x, du] + args + [H]
  dC_part, dhead, tcs = _call(
      functools.partial(_bwd_row_kernel, c=c, names=names), c, (c.nc * nbi, b, nhb), specs,
      [pl.BlockSpec((None, bm, None, nn), lambda i, bi, hb: (bi, i, hb, 0)),
       pl.BlockSpec((None, hp, bm), lambda i, bi, hb: (bi, hb, i)),
       pl.BlockSpec((None, hp, None, q), lambda i, bi, hb: (bi, hb, lax.rem(i, np.int32(nbi)), chunk(i)))],
      [jax.ShapeDtypeStruct((b, lp, nhb, nn), f32), jax.ShapeDtypeStruct((b, h, lp), f32),
       jax.ShapeDtypeStruct((b, h, nbi, lp), f32)],
      "altbench_ssd_bwd_rows", args)

  # Column kernel: programs over (chunk x column tile of bk, batch, head block).
  nbj = q // bk
  chunk = lambda j: idiv(j, nbj)
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
  dx, dB_part, ddt_intra, ddt_state = _call(
      functools.partial(_bwd_col_kernel, c=c, names=names), c, (c.nc * nbj, b, nhb), specs,
      [pl.BlockSpec((None, bk, hp, pp), lambda j, bi, hb: (bi, j, hb, 0)),
       pl.BlockSpec((None, bk, None, nn), lambda j, bi, hb: (bi, j, hb, 0)), vec_out, vec_out],
      [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, lp, nhb, nn), f32),
       jax.ShapeDtypeStruct((b, h, lp), f32), jax.ShapeDtypeStruct((b, h, lp), f32)],
      "altbench_ssd_bwd_cols", args)
  # Remaining partial sums over head blocks of one group.
  per_group = lambda a: a.reshape(b, lp, g, nhb // g, nn).sum(3)
  return dx, per_group(dB_part), per_group(dC_part), ddt_intra, ddt_state, dhead, tcs.sum(2)
