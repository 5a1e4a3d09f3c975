"""Tests for kernels.gated_delta: the chunked XLA path against the token-by-token reference (values and
gradients), the gate gradient against float64 finite differences, closed forms of the delta rule, state
carry-over, packed documents and argument checks."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altbench.kernels.gated_delta import gated_delta
from test_ssd import assert_close, documents

# The module itself, for its private paths (the package attribute altbench.kernels.gated_delta is the function).
gated_delta_module = importlib.import_module("altbench.kernels.gated_delta")

ARG_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(seed, *, b=2, l=37, h=3, dk=8, dv=5, dtype=jnp.float32, g_range=(-1.0, 0.0)):
  """Inputs as a Gated DeltaNet layer makes them: L2-normalised keys, g <= 0, beta in (0, 1)."""
  # numpy RNG: eager jax.random calls would each compile a small program, which costs seconds.
  rng = np.random.default_rng(seed)
  k = rng.standard_normal((b, l, h, dk))
  k /= np.linalg.norm(k, axis=-1, keepdims=True)
  return dict(
      q=jnp.asarray(rng.standard_normal((b, l, h, dk)), dtype),
      k=jnp.asarray(k, dtype),
      v=jnp.asarray(rng.standard_normal((b, l, h, dv)), dtype),
      g=jnp.asarray(rng.uniform(*g_range, (b, l, h)), jnp.float32),
      beta=jnp.asarray(rng.uniform(0.0, 1.0, (b, l, h)), jnp.float32),
      initial_state=jnp.asarray(0.5 * rng.standard_normal((b, h, dk, dv)), jnp.float32),
  )


def cotangents(inputs, seed=100):
  """Fixed random weights for o and the final state, so a scalar loss sees every output."""
  b, l, h, dv = inputs["v"].shape
  dk = inputs["k"].shape[-1]
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((b, l, h, dv)), jnp.float32),
          jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32))


def loss_and_grads(impl, inputs, *, chunk_size, seq_idx=None):
  """jax.grad of <o, cotangent> + <final_state, cotangent> w.r.t. q, k, v, g, beta, initial_state."""
  cot_o, cot_f = cotangents(inputs)

  def loss(*args):
    kw = dict(zip(ARG_NAMES, args))
    o, final = gated_delta(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("g"), kw.pop("beta"), seq_idx=seq_idx,
                           chunk_size=chunk_size, return_final_state=True, impl=impl, **kw)
    return jnp.sum(o.astype(jnp.float32) * cot_o) + jnp.sum(final * cot_f), (o, final)

  grad_fn = jax.jit(jax.grad(loss, argnums=tuple(range(len(ARG_NAMES))), has_aux=True))
  grads, (o, final) = grad_fn(*[inputs[k] for k in ARG_NAMES])
  return o, final, dict(zip(ARG_NAMES, grads))


# (l, chunk, dk, dv, document starts per row or None, dtype). Lengths are not multiples of the chunk;
# starts fall inside a chunk (21), on a chunk edge (12, 24), at the last position (36); chunk 12 is not a
# power of two (the UT transform's inverse pads it). l=300 with chunk 64 runs on CPU as 2 blocks of 3
# chunks (padded), with starts on and next to the block edge (192).
XLA_VS_REF_CASES = [
    (37, 16, 8, 5, None, jnp.float32),
    (37, 12, 6, 10, ((21,), (12, 24, 36)), jnp.float32),
    (300, 64, 4, 6, ((130, 192), (191,)), jnp.float32),
    (37, 16, 8, 5, ((21,), (5, 6)), jnp.bfloat16),
]


@pytest.mark.parametrize("l,chunk,dk,dv,starts,dtype", XLA_VS_REF_CASES)
def test_xla_matches_reference_values_and_grads(l, chunk, dk, dv, starts, dtype):
  b, h = 2, (4 if l == 300 else 3)
  if l == 300 and jax.default_backend() == "cpu":  # keep the multi-block case honest
    assert gated_delta_module._chunks_per_block(b, h, chunk, 5) == 4
  inputs = make_inputs(0, b=b, l=l, h=h, dk=dk, dv=dv, dtype=dtype)
  seq_idx = None if starts is None else documents(b, l, starts)
  # The reference runs on float32 copies: bf16 inputs must give the float32 result up to the final
  # rounding of o and of the gradients to bf16 (relative step 2**-8), hence 1e-2 there.
  inputs_f32 = {k: v.astype(jnp.float32) for k, v in inputs.items()}
  o_ref, f_ref, g_ref = loss_and_grads("reference", inputs_f32, chunk_size=chunk, seq_idx=seq_idx)
  o_xla, f_xla, g_xla = loss_and_grads("xla", inputs, chunk_size=chunk, seq_idx=seq_idx)
  assert o_xla.dtype == dtype and o_xla.shape == (b, l, h, dv)
  assert f_xla.dtype == jnp.float32 and f_xla.shape == (b, h, dk, dv)
  rtol = 1e-4 if dtype == jnp.float32 else 1e-2
  assert_close(o_xla, o_ref, rtol, "o")
  assert_close(f_xla, f_ref, rtol, "final_state")
  for name in ARG_NAMES:
    assert_close(g_xla[name], g_ref[name], rtol, f"d/d{name}")


def test_gate_gradient_under_strong_decay_matches_float64_finite_differences():
  # g alternates between near -10 (the state almost wiped) and near 0 inside chunks, with a document
  # start inside a chunk: d/dg at the strong-decay steps is ~e^-10 times the others, so it is compared
  # element by element (a norm-relative bound would not see it). The xla path's float32 autodiff, and
  # its float64 form, against central differences of the float64 reference.
  b, l, h, dk, dv, chunk = 1, 20, 2, 4, 3, 8
  inputs = make_inputs(11, b=b, l=l, h=h, dk=dk, dv=dv)
  rng = np.random.default_rng(12)
  strong = rng.random((b, l, h)) < 0.4
  g = np.where(strong, -10.0 + rng.uniform(-0.5, 0.5, (b, l, h)), -rng.uniform(0.0, 0.05, (b, l, h)))
  seq_idx = documents(b, l, ((13,),))
  doc = gated_delta_module._document_ids(seq_idx)
  cot_o, cot_f = (np.asarray(c, np.float64) for c in cotangents(inputs))
  scale = dk ** -0.5
  _, _, grads = loss_and_grads("xla", dict(inputs, g=jnp.asarray(g, jnp.float32)), chunk_size=chunk,
                               seq_idx=seq_idx)
  dg_f32 = np.asarray(grads["g"], np.float64)

  with jax.enable_x64(True):
    q, k, v, beta, s0 = (jnp.asarray(np.asarray(inputs[n]), jnp.float64) for n in ("q", "k", "v", "beta",
                                                                                    "initial_state"))
    q = q * scale

    def loss(path, g64):
      o, final = path(q, k, v, g64, beta, s0, doc)
      return jnp.sum(o * cot_o) + jnp.sum(final * cot_f)

    ref_loss = lambda g64: loss(gated_delta_module._reference, g64)
    xla_loss = lambda g64: loss(lambda *a: gated_delta_module._chunked(*a, chunk), g64)
    eps = 1e-6
    steps = eps * np.eye(g.size).reshape((g.size,) + g.shape)
    g64 = jnp.asarray(g, jnp.float64)
    plus, minus = (jax.jit(jax.vmap(ref_loss))(g64 + sign * jnp.asarray(steps)) for sign in (1, -1))
    dg_fd = np.asarray((plus - minus) / (2 * eps)).reshape(g.shape)
    dg_f64 = np.asarray(jax.jit(jax.grad(xla_loss))(g64))

  small = np.abs(dg_fd[strong])
  assert small.max() < 1e-3 * np.abs(dg_fd).max()  # the strong-decay gradients really are tiny
  np.testing.assert_allclose(dg_f64, dg_fd, rtol=1e-6, atol=1e-9 * np.abs(dg_fd).max())
  np.testing.assert_allclose(dg_f32, dg_fd, rtol=1e-3, atol=1e-7 * np.abs(dg_fd).max())


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_beta_zero_only_decays_the_initial_state(impl):
  # Nothing is written: o_t = scale * exp(g_1 + ... + g_t) * S0^T q_t, and o = 0 from a zero state.
  inputs = make_inputs(2, l=19)
  q, k, v, g, s0 = (inputs[n] for n in ("q", "k", "v", "g", "initial_state"))
  zero = jnp.zeros_like(inputs["beta"])
  scale = 0.7
  o, final = gated_delta(q, k, v, g, zero, scale=scale, initial_state=s0, chunk_size=8, return_final_state=True,
                         impl=impl)
  decay = np.exp(np.cumsum(np.asarray(g, np.float64), axis=1))
  expected = scale * decay[..., None] * np.einsum("bhkv,blhk->blhv", np.asarray(s0), np.asarray(q))
  np.testing.assert_allclose(np.asarray(o), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(final), decay[:, -1, :, None, None] * np.asarray(s0), rtol=1e-5)
  assert not np.any(np.asarray(gated_delta(q, k, v, g, zero, chunk_size=8, impl=impl)))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_orthonormal_keys_store_and_overwrite_exactly(impl):
  # g = 0, beta = 1, q = k, orthonormal keys: each step writes v_t under k_t and reads it straight back,
  # o_t = v_t (scale 1). Keys 2 and 5 are written again at the end: the delta rule replaces their values
  # (linear attention would add them), so the final state is sum over keys of k (last value)^T.
  dk, dv = 8, 3
  rng = np.random.default_rng(3)
  basis = np.linalg.qr(rng.standard_normal((dk, dk)))[0]
  order = list(range(dk)) + [2, 5]
  l = len(order)
  keys = basis[order]
  values = rng.standard_normal((l, dv))
  as_input = lambda a: jnp.asarray(a[None, :, None], jnp.float32)
  o, final = gated_delta(as_input(keys), as_input(keys), as_input(values), jnp.zeros((1, l, 1)),
                         jnp.ones((1, l, 1)), scale=1.0, chunk_size=4, return_final_state=True, impl=impl)
  np.testing.assert_allclose(np.asarray(o)[0, :, 0], values, atol=1e-5)
  last = {key: t for t, key in enumerate(order)}
  expected_state = sum(np.outer(basis[key], values[t]) for key, t in last.items())
  np.testing.assert_allclose(np.asarray(final)[0, 0], expected_state, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_beta_one_reads_back_the_value_just_written(impl):
  # With beta = 1 and a unit key the write makes S_t^T k_t = v_t exactly, whatever the decay and the
  # state before: S_t^T k_t = e^g S^T k + (v - e^g S^T k) |k|^2. So q = k, scale 1 reads o_t = v_t at
  # every step, from any initial state and under any gates; decaying after the write would give e^g v_t.
  inputs = make_inputs(10, l=29, g_range=(-3.0, 0.0))
  k = inputs["k"]
  o = gated_delta(k, k, inputs["v"], inputs["g"], jnp.ones_like(inputs["beta"]), scale=1.0,
                  initial_state=inputs["initial_state"], chunk_size=8, impl=impl)
  np.testing.assert_allclose(np.asarray(o), np.asarray(inputs["v"]), atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_split_and_carry_state_equals_one_pass(impl):
  inputs = make_inputs(4, l=53)

  def run(sl, init):
    return gated_delta(*(inputs[n][:, sl] for n in ("q", "k", "v", "g", "beta")), initial_state=init,
                       chunk_size=16, return_final_state=True, impl=impl)

  o, final = run(slice(None), inputs["initial_state"])
  o1, mid = run(slice(0, 21), inputs["initial_state"])  # 21: not a chunk boundary
  o2, final2 = run(slice(21, None), mid)
  assert_close(jnp.concatenate([o1, o2], axis=1), o, 1e-5, "o")
  assert_close(final2, final, 1e-5, "final_state")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_packed_documents_equal_separate_runs(impl):
  # Two documents packed in each row (boundary inside a chunk) give the same outputs as running each
  # one alone; the initial state seeds only the first, the final state is the second's. Row 1 numbers its
  # documents (7, 3): only *changes* of seq_idx matter, not their values.
  len1, len2 = 23, 18
  inputs = make_inputs(5, l=len1 + len2)
  seq_idx = jnp.asarray([[0] * len1 + [1] * len2, [7] * len1 + [3] * len2], jnp.int32)

  def run(sl, init, seq=None):
    return gated_delta(*(inputs[n][:, sl] for n in ("q", "k", "v", "g", "beta")), initial_state=init,
                       seq_idx=seq, chunk_size=16, return_final_state=True, impl=impl)

  o, final = run(slice(None), inputs["initial_state"], seq_idx)
  o1, _ = run(slice(0, len1), inputs["initial_state"])
  o2, final2 = run(slice(len1, None), None)
  assert_close(o[:, :len1], o1, 1e-5, "first document")
  assert_close(o[:, len1:], o2, 1e-5, "second document")
  assert_close(final, final2, 1e-5, "final_state")


def test_gradients_finite_for_extreme_gates():
  # Decays far past float32's exp range (g = -200), g = 0 exactly, beta at 0 and 1, over several chunks.
  inputs = make_inputs(6, b=1, l=70, h=2)
  rng = np.random.default_rng(7)
  inputs["g"] = jnp.asarray(rng.choice([-200.0, -1e-4, 0.0], (1, 70, 2)), jnp.float32)
  inputs["beta"] = jnp.asarray(rng.choice([0.0, 1.0], (1, 70, 2)), jnp.float32)
  o, final, grads = loss_and_grads("xla", inputs, chunk_size=16)
  for name, value in [("o", o), ("final", final)] + list(grads.items()):
    assert bool(jnp.all(jnp.isfinite(value))), f"non-finite {name}"


def test_auto_is_xla():
  inputs = make_inputs(8, l=20)
  args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
  np.testing.assert_array_equal(np.asarray(gated_delta(*args, chunk_size=8)),
                                np.asarray(gated_delta(*args, chunk_size=8, impl="xla")))


@pytest.mark.parametrize("arg,value,match", [
    ("q", jnp.zeros((2, 8, 3)), r"q has shape \(2, 8, 3\), expected"),
    ("k", jnp.zeros((2, 8, 3, 7)), r"k has shape \(2, 8, 3, 7\), expected the shape of q"),
    ("v", jnp.zeros((2, 9, 3, 5)), r"v has shape \(2, 9, 3, 5\), expected"),
    ("g", jnp.zeros((2, 8, 3, 1)), r"g has shape \(2, 8, 3, 1\), expected \(batch, seqlen, nheads\)"),
    ("beta", jnp.zeros((2, 8)), r"beta has shape \(2, 8\), expected"),
    ("initial_state", jnp.zeros((2, 3, 5, 8)), r"initial_state has shape \(2, 3, 5, 8\), expected"),
    ("seq_idx", jnp.zeros((2, 9), jnp.int32), r"seq_idx has shape \(2, 9\)"),
    ("seq_idx", jnp.zeros((2, 8)), r"seq_idx must have an integer dtype"),
    ("chunk_size", 0, r"chunk_size must be a positive int, got 0"),
    ("scale", "big", r"scale must be a real number or None, got 'big'"),
    ("impl", "triton", r"unknown impl 'triton'.*'reference'.*'xla'"),
])
def test_bad_arguments_raise(arg, value, match):
  inputs = make_inputs(9, l=8)
  kw = {n: inputs[n] for n in ARG_NAMES}
  kw[arg] = value
  with pytest.raises(ValueError, match=match):
    gated_delta(**kw)
