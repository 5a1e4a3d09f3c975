"""kernels.attention: the XLA path against the plain reference, outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altbench.kernels import attention


def _inputs(b, t, h, hk, d, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), dtype)
  k = jax.random.normal(ks[1], (b, t, hk, d), dtype)
  v = jax.random.normal(ks[2], (b, t, hk, d), dtype)
  seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.1, (b, t)), axis=1).astype(jnp.int32)
  return q, k, v, seg


@pytest.mark.parametrize("t,h,hk,causal,use_seg", [
    (17, 4, 4, True, False), (33, 4, 2, True, True), (31, 6, 1, False, True), (8, 2, 2, False, False),
    (128, 4, 2, True, True),   # 128: the blocked causal XLA path
    (1280, 2, 1, True, True)])  # 20 blocks of 64 merged into 10 of 128 (MAX_CAUSAL_BLOCKS)
def test_xla_matches_reference(t, h, hk, causal, use_seg):
  q, k, v, seg = _inputs(2, t, h, hk, 16)
  seg = seg if use_seg else None
  cot = jax.random.normal(jax.random.key(9), q.shape)

  def f(impl):
    return lambda q, k, v: jnp.sum(attention(q, k, v, causal=causal, segment_ids=seg, impl=impl) * cot)

  ref, xla = f("reference"), f("xla")
  np.testing.assert_allclose(jax.jit(xla)(q, k, v), jax.jit(ref)(q, k, v), rtol=1e-4, atol=1e-3)
  grads = lambda fn: jax.jit(jax.grad(fn, (0, 1, 2)))(q, k, v)  # jit: op-by-op dispatch is the slow part
  for g_x, g_r in zip(grads(xla), grads(ref)):
    np.testing.assert_allclose(g_x, g_r, rtol=1e-4, atol=1e-4)


def test_reference_closed_form():
  # One key visible per query (causal, t=2, first row) -> output is exactly that value; uniform logits
  # (q = 0) -> the mean of the visible values.
  v = jnp.arange(2 * 3, dtype=jnp.float32).reshape(1, 2, 1, 3)
  q = jnp.zeros((1, 2, 1, 3))
  out = attention(q, v, v, causal=True, impl="reference")
  np.testing.assert_allclose(out[0, 0, 0], v[0, 0, 0])
  np.testing.assert_allclose(out[0, 1, 0], v[0, :, 0].mean(0))


def test_segments_block_leakage():
  q, k, v, _ = _inputs(1, 12, 2, 2, 8)
  seg = jnp.array([[1] * 5 + [2] * 7])
  full = attention(q, k, v, causal=True, segment_ids=seg, impl="xla")
  second = attention(q[:, 5:], k[:, 5:], v[:, 5:], causal=True, impl="xla")
  np.testing.assert_allclose(full[:, 5:], second, rtol=1e-5, atol=1e-5)


def test_kv_cache_style_mask():
  q, k, v, _ = _inputs(1, 9, 2, 1, 8)
  valid = (jnp.arange(9) <= 4).astype(jnp.int32)[None]
  out = attention(q[:, 4:5], k, v, causal=False, segment_ids=(jnp.ones((1, 1), jnp.int32), valid), impl="xla")
  ref = attention(q[:, :5], k[:, :5], v[:, :5], causal=True, impl="reference")[:, 4:5]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_close_to_f32():
  q, k, v, seg = _inputs(2, 20, 4, 2, 16)
  out = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                  causal=True, segment_ids=seg, impl="xla")
  ref = attention(q, k, v, causal=True, segment_ids=seg, impl="reference")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


def test_errors_name_the_problem():
  q, k, v, _ = _inputs(1, 4, 3, 2, 8)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    attention(q, k, v, causal=True)
  q, k, v, _ = _inputs(1, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="impl='cuda'"):
    attention(q, k, v, causal=True, impl="cuda")


def test_explicit_mask_combines_with_causal_and_segments():
  q, k, v, seg = _inputs(2, 12, 2, 2, 8)
  rng = np.random.default_rng(0)
  mask = jnp.asarray(rng.random((12, 12)) < 0.6) | jnp.eye(12, dtype=bool)
  for impl in ("reference", "xla"):
    out = attention(q, k, v, causal=True, segment_ids=seg, mask=mask, impl=impl)
    # The same visibility written as one explicit (b, T, S) mask.
    full = mask[None] & jnp.tril(jnp.ones((12, 12), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    want = attention(q, k, v, causal=False, mask=full, impl="reference")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # and it does restrict: dropping the mask changes the output
  assert not np.allclose(attention(q, k, v, causal=True, segment_ids=seg, impl="xla"), out, atol=1e-3)
