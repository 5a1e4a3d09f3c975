"""Tests for kernels.ssd: the chunked XLA path against the sequential reference, the reference
against closed forms, state carry-over, packed documents, numerical safety and argument checks."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altbench.kernels.ssd import ssd

ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_inputs(seed, *, b=2, l=37, h=4, p=8, g=2, n=8, dtype=jnp.float32, d_per_channel=False,
                with_z=True):
  # numpy RNG: eager jax.random calls would each compile a small program, which costs seconds.
  rng = np.random.default_rng(seed)
  normal = lambda shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), dtype)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return dict(
      x=normal((b, l, h, p)),
      dt=normal((b, l, h)),
      A=f32(-np.exp(rng.uniform(-1.0, 1.0, (h,)))),
      B=normal((b, l, g, n), 0.5),
      C=normal((b, l, g, n), 0.5),
      D=f32(rng.standard_normal((h, p) if d_per_channel else (h,))),
      z=normal((b, l, h, p)) if with_z else None,
      dt_bias=f32(0.5 * rng.standard_normal((h,))),
      initial_states=normal((b, h, p, n), 0.5),
  )


def documents(b, l, starts):
  """seq_idx (b, l) whose row i starts a new document at each position in starts[i]."""
  ids = np.zeros((b, l), np.int32)
  for row, row_starts in enumerate(starts):
    for start in row_starts:
      ids[row, start:] += 1
  return jnp.asarray(ids)


def loss_and_grads(impl, inputs, *, chunk_size, seq_idx=None, dt_softplus=True):
  """jax.grad of <y, random cotangent> + <final_states, random cotangent> w.r.t. every float input."""
  names = [k for k in ARG_NAMES if inputs[k] is not None]
  b, l, h, p = inputs["x"].shape
  n = inputs["B"].shape[-1]
  rng = np.random.default_rng(100)
  cot_y = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)
  cot_f = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)

  def loss(*args):
    kw = dict(zip(names, args))
    y, final = ssd(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), chunk_size,
                   seq_idx=seq_idx, dt_softplus=dt_softplus, return_final_states=True, impl=impl, **kw)
    return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(final * cot_f), (y, final)

  grad_fn = jax.jit(jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True))
  grads, (y, final) = grad_fn(*[inputs[k] for k in names])
  return y, final, dict(zip(names, grads))


def assert_close(actual, expected, rtol, what):
  """Elementwise |a - e| <= rtol * max|e| (a norm-relative bound: robust near zeros)."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32))
  expected = np.asarray(jnp.asarray(expected, jnp.float32))
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  scale = max(float(np.max(np.abs(expected))), 1e-6)
  err = float(np.max(np.abs(actual - expected)))
  assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol} * max|ref| ({scale:.3g})"


# (l, chunk, ngroups, D per (h, p), z, dt_softplus, document starts per row or None, dtype).
# Starts: inside a chunk (21), on a chunk edge (32), at the last position, and, for l=300 with
# chunk 64 (run on CPU as 2 blocks of 3 chunks, padded), on and near the block edge (192).
XLA_VS_REF_CASES = [
    (64, 16, 1, False, False, True, None, jnp.float32),
    (37, 16, 2, True, True, False, ((21,), (32,)), jnp.float32),
    (37, 16, 1, False, True, True, ((21, 36), (5, 6)), jnp.float32),
    (37, 16, 2, True, True, True, ((21,), (32,)), jnp.bfloat16),
    (300, 64, 1, True, True, True, ((130, 192), (191,)), jnp.float32),
]


@pytest.mark.parametrize("l,chunk,g,d_per_channel,with_z,softplus,starts,dtype", XLA_VS_REF_CASES)
def test_xla_matches_reference_values_and_grads(l, chunk, g, d_per_channel, with_z, softplus, starts,
                                                dtype):
  if l == 300 and jax.default_backend() == "cpu":  # keep the multi-block case honest
    assert sys.modules["altbench.kernels.ssd"]._chunks_per_block(2, 4, chunk, 5, 8, 8) == 4
  inputs = make_inputs(0, l=l, g=g, dtype=dtype, d_per_channel=d_per_channel, with_z=with_z)
  if not softplus:
    # Without softplus, dt + dt_bias must already be a valid (positive) step.
    inputs["dt"] = (jnp.abs(inputs["dt"]) + 0.6).astype(dtype)
    inputs["dt_bias"] = jnp.clip(inputs["dt_bias"], -0.5, 0.5)
  seq_idx = None if starts is None else documents(2, l, starts)
  kw = dict(chunk_size=chunk, seq_idx=seq_idx, dt_softplus=softplus)
  # The reference always runs on float32 copies: bf16 inputs must give the float32 result (all
  # math is float32) up to the final rounding of y and of the gradients to bf16 (relative step
  # 2**-8), hence the 1e-2 tolerance there; in fp32 the paths agree to rounding.
  inputs_f32 = {k: None if v is None else v.astype(jnp.float32) for k, v in inputs.items()}
  y_ref, f_ref, g_ref = loss_and_grads("reference", inputs_f32, **kw)
  y_xla, f_xla, g_xla = loss_and_grads("xla", inputs, **kw)
  assert y_xla.dtype == dtype and y_xla.shape == inputs["x"].shape
  assert f_xla.dtype == jnp.float32
  rtol = 1e-4 if dtype == jnp.float32 else 1e-2
  assert_close(y_xla, y_ref, rtol, "y")
  assert_close(f_xla, f_ref, rtol, "final_states")
  assert set(g_xla) == set(g_ref) == {k for k in ARG_NAMES if inputs[k] is not None}
  for name in g_ref:
    assert_close(g_xla[name], g_ref[name], rtol, f"d/d{name}")


def test_reference_matches_closed_form():
  # One head, one channel, one state, constants: h_t = e h_{t-1} + dt b x with e = exp(dt a),
  # a geometric series h_t = e^(t+1) h0 + dt b x (1 - e^(t+1)) / (1 - e).
  l, raw_dt, bias, a, bb, cc, x0, h0, d, z0 = 50, 0.3, -0.1, -0.7, 1.5, -0.8, 2.0, 0.25, 0.6, 0.4
  dt = math.log1p(math.exp(raw_dt + bias))
  e = math.exp(dt * a)
  t = np.arange(l)
  h_t = e ** (t + 1) * h0 + dt * bb * x0 * (1 - e ** (t + 1)) / (1 - e)
  silu = z0 / (1 + math.exp(-z0))
  y_expected = (cc * h_t + d * x0) * silu

  full = lambda shape, v: jnp.full(shape, v, jnp.float32)
  for impl in ("reference", "xla"):
    y, final = ssd(full((1, l, 1, 1), x0), full((1, l, 1), raw_dt), full((1,), a), full((1, l, 1, 1), bb),
                   full((1, l, 1, 1), cc), 16, D=full((1,), d), z=full((1, l, 1, 1), z0),
                   dt_bias=full((1,), bias), initial_states=full((1, 1, 1, 1), h0), dt_softplus=True,
                   return_final_states=True, impl=impl)
    np.testing.assert_allclose(np.asarray(y)[0, :, 0, 0], y_expected, rtol=1e-5, err_msg=impl)
    np.testing.assert_allclose(float(final[0, 0, 0, 0]), h_t[-1], rtol=1e-5, err_msg=impl)


def test_segsum_is_stable_after_a_large_decay():
  # Huge steps then tiny ones inside one chunk: the within-chunk cumsum of dt*A reaches -3200, so
  # differencing it (cumsum[i] - cumsum[j]) would put ~2e-4 relative error into every decay
  # factor of the tiny steps. The masked segment sum keeps the error at float32 rounding.
  l = 64
  dt = np.full((1, l, 1), 0.01, np.float32)
  dt[0, :32, 0] = 100.0
  rng = np.random.default_rng(9)
  x, B, C = (jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
             for shape in [(1, l, 1, 1), (1, l, 1, 1), (1, l, 1, 1)])
  args = (x, jnp.asarray(dt), -jnp.ones((1,)), B, C, l)
  y_ref, y_xla = (np.asarray(ssd(*args, impl=impl))[0, 32:, 0, 0] for impl in ("reference", "xla"))
  np.testing.assert_allclose(y_xla, y_ref, rtol=2e-5)


def test_dt_preprocessing():
  # softplus uses the threshold 20 (identity above), then dt_limit clamps; compare with feeding
  # the processed dt directly. Raw dt spans both softplus branches and both clamp bounds.
  inputs = make_inputs(1, l=8, with_z=False)
  raw = jnp.asarray(np.linspace(-5.0, 40.0, 2 * 8 * 4).reshape(2, 8, 4), jnp.float32)
  sp = np.where(np.asarray(raw) > 20, np.asarray(raw), np.log1p(np.exp(np.minimum(np.asarray(raw), 20))))
  processed = jnp.asarray(np.clip(sp, 0.05, 35.0), jnp.float32)
  common = {k: inputs[k] for k in ("x", "A", "B", "C")}
  # The preprocessing is shared by every impl, so checking one covers all.
  y = ssd(dt=raw, chunk_size=4, dt_softplus=True, dt_limit=(0.05, 35.0), impl="reference", **common)
  y_direct = ssd(dt=processed, chunk_size=4, impl="reference", **common)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_direct), rtol=1e-6, atol=1e-6)


def test_group_to_head_mapping():
  # Head i reads group i // (nheads // ngroups): zeroing group 1's B silences heads 2 and 3 only.
  inputs = make_inputs(2, h=4, g=2, with_z=False)
  B = inputs["B"].at[:, :, 1].set(0.0)
  for impl in ("reference", "xla"):
    y = ssd(inputs["x"], inputs["dt"], inputs["A"], B, inputs["C"], 16, impl=impl)
    per_head = np.abs(np.asarray(y)).max(axis=(0, 1, 3))
    assert np.all(per_head[:2] > 1e-3) and np.all(per_head[2:] == 0.0), (impl, per_head)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_split_and_carry_state_equals_one_pass(impl):
  inputs = make_inputs(3, l=53)
  call = lambda sl, init: ssd(inputs["x"][:, sl], inputs["dt"][:, sl], inputs["A"], inputs["B"][:, sl],
                              inputs["C"][:, sl], 16, D=inputs["D"], z=inputs["z"][:, sl],
                              dt_bias=inputs["dt_bias"], initial_states=init, dt_softplus=True,
                              return_final_states=True, impl=impl)
  y, final = call(slice(None), inputs["initial_states"])
  y1, mid = call(slice(0, 21), inputs["initial_states"])  # 21: not a chunk boundary
  y2, final2 = call(slice(21, None), mid)
  assert_close(jnp.concatenate([y1, y2], axis=1), y, 1e-5, "y")
  assert_close(final2, final, 1e-5, "final_states")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_packed_documents_equal_separate_runs(impl):
  # Two documents packed in each row (boundary inside a chunk) give the same outputs as running
  # each one alone; initial_states seed only the first, the final state is the second's. Row 1
  # numbers its documents (7, 3): only *changes* of seq_idx matter, not their values.
  len1, len2 = 23, 18
  inputs = make_inputs(4, b=2, l=len1 + len2)
  seq_idx = jnp.asarray([[0] * len1 + [1] * len2, [7] * len1 + [3] * len2], jnp.int32)

  def run(sl, init, seq=None):
    return ssd(inputs["x"][:, sl], inputs["dt"][:, sl], inputs["A"], inputs["B"][:, sl],
               inputs["C"][:, sl], 16, D=inputs["D"], z=inputs["z"][:, sl], dt_bias=inputs["dt_bias"],
               initial_states=init, seq_idx=seq, dt_softplus=True, return_final_states=True, impl=impl)

  y, final = run(slice(None), inputs["initial_states"], seq_idx)
  y1, _ = run(slice(0, len1), inputs["initial_states"])
  y2, final2 = run(slice(len1, None), None)
  assert_close(y[:, :len1], y1, 1e-5, "first document")
  assert_close(y[:, len1:], y2, 1e-5, "second document")
  assert_close(final, final2, 1e-5, "final_states")


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_no_nan_for_adversarial_inputs(impl):
  # Strong decay (|A| up to 16), huge steps (raw dt up to 100 with softplus, past its threshold,
  # and down to -30), long bf16 sequence with packed documents: outputs and all gradients finite.
  b, l, h, p, g, n = 1, 8192, 2, 4, 1, 4
  rng = np.random.default_rng(5)
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  x = bf16(rng.standard_normal((b, l, h, p)))
  raw_dt = rng.uniform(-30.0, 100.0, (b, l, h))
  raw_dt[:, ::7] = 10.0
  dt = bf16(raw_dt)
  A = -jnp.array([16.0, 0.01])
  B = bf16(rng.standard_normal((b, l, g, n)))
  C = bf16(rng.standard_normal((b, l, g, n)))
  h0 = bf16(rng.standard_normal((b, h, p, n)))
  seq_idx = jnp.asarray(np.arange(l)[None] // 3000, jnp.int32)

  def loss(x, dt, A, B, C, h0):
    y, final = ssd(x, dt, A, B, C, 64, initial_states=h0, seq_idx=seq_idx, dt_softplus=True,
                   return_final_states=True, impl=impl)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final), (y, final)

  grads, (y, final) = jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(x, dt, A, B, C, h0)
  for name, v in [("y", y), ("final", final)] + list(zip(["x", "dt", "A", "B", "C", "h0"], grads)):
    assert bool(jnp.all(jnp.isfinite(v.astype(jnp.float32)))), f"{impl}: non-finite {name}"


def test_auto_is_xla():
  inputs = make_inputs(6, l=20, with_z=False)
  args = (inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 8)
  np.testing.assert_array_equal(np.asarray(ssd(*args)), np.asarray(ssd(*args, impl="xla")))


def test_bad_impl_raises():
  inputs = make_inputs(7, l=8, with_z=False)
  with pytest.raises(ValueError, match=r"'triton'.*'reference'.*'xla'.*'pallas'"):
    ssd(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 4, impl="triton")


@pytest.mark.parametrize("arg,value,match", [
    ("dt", jnp.zeros((2, 8)), r"dt has shape \(2, 8\), expected"),
    ("A", jnp.zeros((3,)), r"A has shape \(3,\), expected"),
    ("B", jnp.zeros((2, 8, 3, 8)), r"nheads=4 .* ngroups=3"),
    ("C", jnp.zeros((2, 8, 2, 5)), r"C has shape \(2, 8, 2, 5\), expected"),
    ("D", jnp.zeros((4, 3)), r"D has shape \(4, 3\), expected"),
    ("z", jnp.zeros((2, 8, 4, 7)), r"z has shape"),
    ("dt_bias", jnp.zeros((1,)), r"dt_bias has shape"),
    ("initial_states", jnp.zeros((2, 4, 8, 3)), r"initial_states has shape \(2, 4, 8, 3\)"),
    ("seq_idx", jnp.zeros((2, 9), jnp.int32), r"seq_idx has shape \(2, 9\)"),
    ("seq_idx", jnp.zeros((2, 8)), r"seq_idx must have an integer dtype"),
    ("chunk_size", 0, r"chunk_size must be a positive int"),
])
def test_bad_shapes_raise(arg, value, match):
  inputs = make_inputs(8, l=8, with_z=False)
  kw = dict(x=inputs["x"], dt=inputs["dt"], A=inputs["A"], B=inputs["B"], C=inputs["C"], chunk_size=4)
  kw[arg] = value
  with pytest.raises(ValueError, match=match):
    ssd(**kw)
