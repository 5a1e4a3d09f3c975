"""One chunk of the gated delta rule, forward and hand-derived backward, as plain array math: the bodies that
both Pallas backends run (``chunk_inverse`` in a parallel kernel over chunks; ``chunk_fwd`` / ``chunk_bwd``
in the sequential kernels, kernels/gated_delta_pallas_gpu.py once per loop step over chunks,
kernels/gated_delta_pallas_tpu.py once per grid step), and that the tests check against jax.vjp of its own
forward in float64.

One chunk of C positions (i, j as rows / columns of a C x C matrix), entering with state S (dk, dv); the
equations are those of kernels/gated_delta.py's module docstring, with q scaled by ``scale`` here:

  G_ij = exp(gam_i - gam_j) for j <= i in the same document, else 0    gam = within-chunk cumsum of g
  e_i  = exp(gam_i), zero off the document the entering state belongs to
  l_j  = exp(gam_last - gam_j), zero off the chunk's last document (= row C-1 of G)
  gc   = exp(gam_last), zero if the chunk's last document is not the entering one
  A    = strictly lower (beta_i k_i.k_j G_ij),  T = (I + A)^-1      (forward substitution)
  U    = T diag(beta) V,  W = T diag(beta e) K,  V' = U - W S
  O    = diag(e) Qs S + (Qs K^T * G) V',  S_end = gc S + (diag(l) K)^T V'

Backward, given dO and dS_end (the gradient of the state leaving the chunk): with D = dO V'^T,
  dV' = (Qs K^T * G)^T dO + diag(l) K dS_end        dW = -dV' S^T        dU = dV'
  dT  = dU (diag(beta) V)^T + dW (diag(beta e) K)^T  dA = -T^T dT T^T, kept strictly lower
  dS  = gc dS_end + (diag(e) Qs)^T dO - W^T dV'     (the gradient of the state entering the chunk)
and the products' gradients w.r.t. q, k, v, beta; G, e, l and gc carry the gradient of g. With
P_ij = dG_ij G_ij (the gradient w.r.t. the segment sum gam_i - gam_j), dg_m = sum_{i >= m > j} P_ij +
sum_{i >= m} dgam_i. The pair sum is taken as X = P J with J_jm = [j < m] (one exact C x C x C matmul: X_im
= sum_{j < m} P_ij, a prefix sum of row i), then a masked column sum over i >= m: no "row sums minus
column sums" difference, which would cancel under strong decays (the SSD kernels' _intra_ddA, by a matmul).

Decays come from a compensated (hi, lo) cumulative sum of g (made in XLA, kernels/gated_delta_pallas.py):
segment sums are (hi_i - hi_j) + (lo_i - lo_j), accurate to the rounding of the difference itself, and every
exponent is clamped at <= 0 before the exp, masks applied to its result.

Layouts: everything is 2-D, so that one body lowers on Triton and on Mosaic: per-position vectors come as
columns (C, 1) and, where a row is needed, rows (1, C); reductions keep their dims. The backends provide the
matmul (``mm``): operands cast to the input dtype (bf16 in, float32 accumulation; float32 operands at
HIGHEST precision), or exact (``exact=True``: operands in the accumulation dtype, for the 0/1 prefix-sum
matrix and for float64 tests).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from altbench.kernels.pallas_common import fori


class Chunk(NamedTuple):
  """One chunk's inputs. q, k (C, dk) and v (C, dv) in the input dtype; beta, hi, lo (C, 1) columns and
  beta_r, hi_r, lo_r (1, C) rows in the accumulation dtype; doc (C, 1) / doc_r (1, C) int document ids and
  ent (C, 1) (1 where a position belongs to the document of the entering state), or None without
  documents."""
  q: object
  k: object
  v: object
  beta: object
  beta_r: object
  hi: object
  lo: object
  hi_r: object
  lo_r: object
  doc: object = None
  doc_r: object = None
  ent: object = None


def make_mm(operand_dtype, acc_dtype, tn=None):
  """The matmul of the chunk body: mm(a, b, kind) with kind "nn" (a b), "nt" (a b^T), "tn" (a^T b).

  tn: an optional replacement for the "tn" product (the TPU backend transposes a in float32 first)."""
  dims = {"nn": ((1,), (0,)), "nt": ((1,), (1,)), "tn": ((0,), (0,))}

  def mm(a, b, kind="nn", exact=False):
    dtype = acc_dtype if exact else operand_dtype
    a, b = a.astype(dtype), b.astype(dtype)
    if kind == "tn" and tn is not None:
      return tn(a, b)
    precision = lax.Precision.HIGHEST if dtype != jnp.bfloat16 and dtype != jnp.float16 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (dims[kind], ((), ())), precision=precision, preferred_element_type=acc_dtype)

  return mm


def _iota(c):
  return lax.broadcasted_iota(jnp.int32, (c, c), 0), lax.broadcasted_iota(jnp.int32, (c, c), 1)


def _pick_last(col):
  """The last entry of a (C, 1) column as a (1, 1) array."""
  c = col.shape[0]
  last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
  return jnp.sum(jnp.where(last, col, jnp.zeros_like(col)), axis=0, keepdims=True)


def _keep(x, transposed):
  """Where the decay matrix (or its transpose) is nonzero: causal, within one document."""
  row, col = _iota(x.hi.shape[0])
  keep = row <= col if transposed else row >= col
  return keep if x.doc is None else keep & (x.doc == x.doc_r)


def decays(x):
  """G (C, C), e (C, 1), l (C, 1), gc (1, 1) of a chunk (module docstring)."""
  zero = jnp.zeros((), x.hi.dtype)
  seg = (x.hi - x.hi_r) + (x.lo - x.lo_r)           # [i, j] = gam_i - gam_j
  hi_last, lo_last = _pick_last(x.hi), _pick_last(x.lo)
  l = jnp.exp(jnp.minimum((hi_last - x.hi) + (lo_last - x.lo), zero))
  e = jnp.exp(jnp.minimum(x.hi + x.lo, zero))
  gc = jnp.exp(jnp.minimum(hi_last + lo_last, zero))
  if x.doc is not None:
    l = jnp.where(x.doc == _pick_last(x.doc), l, zero)
    e = e * x.ent
    gc = gc * _pick_last(x.ent)
  return jnp.where(_keep(x, False), jnp.exp(jnp.minimum(seg, zero)), zero), e, l, gc


def decay_t(x):
  """G^T (C, C) of a chunk: [j, i] = G_ij."""
  zero = jnp.zeros((), x.hi.dtype)
  seg_t = (x.hi_r - x.hi) + (x.lo_r - x.lo)         # [j, i] = gam_i - gam_j
  return jnp.where(_keep(x, True), jnp.exp(jnp.minimum(seg_t, zero)), zero)


def unit_lower_inverse(A_t):
  """T = (I + A)^-1 for A strictly lower triangular, given A^T, by forward substitution: row i of T is
  e_i - sum_{j < i} A_ij T_j, one row per step (C steps of C x C elementwise work, iota masks only)."""
  c = A_t.shape[0]
  row, col = _iota(c)
  zero = jnp.zeros((), A_t.dtype)

  def body(i, T):
    a_i = jnp.sum(jnp.where(col == i, A_t, zero), axis=1, keepdims=True)   # (C, 1): A[i, j] at row j
    r = jnp.sum(a_i * T, axis=0, keepdims=True)                            # (1, C): sum_j A_ij T_j
    eye_i = jnp.where(col == i, 1.0, 0.0).astype(A_t.dtype)
    return jnp.where(row == i, eye_i - r, T)

  return fori(0, c, body, jnp.zeros((c, c), A_t.dtype))


def chunk_inverse(x, mm):
  """T = (I + A)^-1 of one chunk (needs only k, beta and the decays of x): the one piece of the chunk that
  does not depend on the state, computed for all chunks in parallel by its own kernel."""
  c = x.hi.shape[0]
  row, col = _iota(c)
  A_t = jnp.where(row < col, mm(x.k, x.k, "nt") * decay_t(x) * x.beta_r, jnp.zeros((), x.hi.dtype))
  return unit_lower_inverse(A_t)


def _parts(x, S, T, mm, scale):
  """Everything the forward computes, kept for the backward (T from chunk_inverse)."""
  acc = x.hi.dtype
  G, e, l, gc = decays(x)
  qs = x.q.astype(acc) * scale
  k, v = x.k.astype(acc), x.v.astype(acc)
  kk = mm(x.k, x.k, "nt")
  bv, bk = x.beta * v, (x.beta * e) * k
  W = mm(T, bk)
  vn = mm(T, bv) - mm(W, S)
  qk = mm(qs, x.k, "nt")
  return dict(G=G, e=e, l=l, gc=gc, qs=qs, k=k, v=v, kk=kk, bv=bv, bk=bk, W=W, vn=vn, qk=qk)


def chunk_fwd(x, S, T, mm, scale):
  """(O (C, dv), S_end (dk, dv)) of one chunk entering with state S, in the accumulation dtype."""
  p = _parts(x, S, T, mm, scale)
  o = mm(p["e"] * p["qs"], S) + mm(p["qk"] * p["G"], p["vn"])
  s_end = p["gc"] * S + mm(p["l"] * p["k"], p["vn"], "tn")
  return o, s_end


def chunk_bwd(x, S, T, do, ds_end, mm, scale):
  """Gradients of one chunk: (dq, dk, dv, dbeta (C, 1), dg (1, C), dS (the entering state's))."""
  p = _parts(x, S, T, mm, scale)
  acc = x.hi.dtype
  c = x.hi.shape[0]
  row, col = _iota(c)
  zero = jnp.zeros((), acc)
  G, e, l, gc, qs, k, v, kk, W, vn, qk = (p[n] for n in ("G", "e", "l", "gc", "qs", "k", "v", "kk", "W", "vn",
                                                            "qk"))
  do = do.astype(acc)
  # O = diag(e) Qs S + (Qs K^T * G) V'
  D = mm(do, vn, "nt")
  DG = D * G
  dos = mm(do, S, "nt")
  dqs = e * dos + mm(DG, k)
  de = jnp.sum(qs * dos, axis=1, keepdims=True)
  dk = mm(DG, qs, "tn")
  dG = D * qk
  dvn = mm(qk * G, do, "tn") + mm(l * k, ds_end)
  # S_end = gc S + (diag(l) K)^T V'
  vds = mm(vn, ds_end, "nt")
  dk = dk + l * vds
  dl = jnp.sum(k * vds, axis=1, keepdims=True)
  dgc = jnp.sum(jnp.sum(ds_end * S, axis=1, keepdims=True), axis=0, keepdims=True)
  dS = gc * ds_end + mm(e * qs, do, "tn") - mm(W, dvn, "tn")
  # V' = T diag(beta) V - T diag(beta e) K S
  dW = -mm(dvn, S, "nt")
  dT = mm(dvn, p["bv"], "nt") + mm(dW, p["bk"], "nt")
  dbv = mm(T, dvn, "tn")
  dv = x.beta * dbv
  dbeta = jnp.sum(dbv * v, axis=1, keepdims=True)
  dbk = mm(T, dW, "tn")
  dk = dk + (x.beta * e) * dbk
  t = jnp.sum(dbk * k, axis=1, keepdims=True)
  dbeta = dbeta + e * t
  de = de + x.beta * t
  # T = (I + A)^-1, A = strictly lower (beta_i kk_ij G_ij)
  dA = -mm(mm(T, dT, "tn"), T, "nt")
  dA = jnp.where(row > col, dA, zero)
  dbeta = dbeta + jnp.sum(dA * kk * G, axis=1, keepdims=True)
  dkk = dA * x.beta * G
  dk = dk + mm(dkk, k) + mm(dkk, k, "tn")
  dG = dG + dA * x.beta * kk
  # g: through the segment sums (G and l) and the running sums (e and gc).
  P = dG * G
  X = mm(P, jnp.where(row < col, 1.0, 0.0).astype(acc), exact=True)      # X_im = sum_{j < m} P_ij
  last = lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1
  dgam = de * e + jnp.where(last, dgc * gc, zero)
  dg = jnp.sum(jnp.where(row >= col, X + dgam, zero), axis=0, keepdims=True)
  dg = dg + jnp.sum(jnp.where(row < col, dl * l, zero), axis=0, keepdims=True)
  return dqs * scale, dk, dv, dbeta, dg, dS
