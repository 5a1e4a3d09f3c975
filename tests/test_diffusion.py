"""Masked and block diffusion: closed forms, the exact NELBO, SUBS, the block-causal mask, the B=1 and B=L
limits, and the samplers."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altbench.archs import diffusion as D

V, MASK, EOS = 262, 258, 256


def _cfg(**kw):
  return D.Config(**{"vocab_size": V, "d_model": 32, "n_heads": 2, "pattern": "AA", "mask_id": MASK, "eos_id": EOS,
                     **kw})


def _model(**kw):
  cfg = _cfg(**kw)
  return cfg, D.build(cfg, nnx.Rngs(0))


class Uniform:
  """A 'model' whose logits are all equal: uniform over the vocabulary (minus <mask> after SUBS)."""

  def __init__(self, cfg):
    self.cfg = cfg

  def __call__(self, tokens, *args, **kwargs):
    return jnp.zeros(tokens.shape + (V,)), None


@pytest.mark.parametrize("schedule", D.SCHEDULES)
def test_uniform_model_nelbo_is_L_log_V(schedule):
  cfg = _cfg(schedule=schedule, eps=1e-4)
  b, l = 4096, 8
  x = jax.random.randint(jax.random.key(0), (b, l), 0, 256)
  batch = {"targets": x, "loss_mask": jnp.ones_like(x), "nbytes": jnp.ones_like(x)}
  model = Uniform(cfg)
  rows = []
  for seed in range(4):
    t = D.draw_times(jax.random.key(seed), (b, 1), cfg.eps, True)
    terms, _, _ = D.nelbo_terms(model, cfg, x, batch["loss_mask"], t, jax.random.uniform(jax.random.key(99 + seed), (b, l)))
    rows.append(terms.sum(1))
  per_seq = jnp.concatenate(rows)
  mean, se = float(per_seq.mean()), float(per_seq.std() / math.sqrt(per_seq.size))
  a_eps, _ = D.alpha(schedule, jnp.array(cfg.eps))
  a_one, _ = D.alpha(schedule, jnp.array(1.0))
  exact = float(a_eps - a_one) * l * math.log(V - 1)  # integral of -alpha' over [eps, 1], times L ln V
  assert abs(mean - exact) < 4 * se + 1e-3 and se < 0.05 * exact
  assert exact == pytest.approx(l * math.log(V - 1), rel=3e-3)  # and [0, eps] adds next to nothing


def test_monte_carlo_matches_the_exact_integral():
  # Tiny case: L = 3, a random model; the exact NELBO sums over all 2^3 mask patterns and integrates t.
  cfg, model = _model(schedule="cosine", eps=1e-3)
  x = jnp.array([[5, 17, 200]])
  patterns = jnp.array(list(itertools.product([0, 1], repeat=3)), bool)
  z = jnp.where(patterns, MASK, x)
  logits, _ = model(z, segment_ids_BL=jnp.zeros_like(z))
  lp = D.subs_log_probs(logits, z, MASK)
  ce = -jnp.take_along_axis(lp, jnp.broadcast_to(x, z.shape)[..., None], -1)[..., 0]
  s_m = jnp.sum(jnp.where(patterns, ce, 0.0), axis=1)  # (8,)
  t = cfg.eps + (1 - cfg.eps) * (jnp.arange(20000) + 0.5) / 20000
  a, _ = D.alpha(cfg.schedule, t)
  k = patterns.sum(1)
  prob = (1 - a)[:, None] ** k[None] * a[:, None] ** (3 - k)[None]
  exact = float(jnp.mean(D.nelbo_weight(cfg.schedule, t) * (prob @ s_m)) * (1 - cfg.eps))

  b = 8192
  xb = jnp.broadcast_to(x, (b, 3))
  t_b = D.draw_times(jax.random.key(1), (b, 1), cfg.eps, True)
  terms, _, _ = D.nelbo_terms(model, cfg, xb, jnp.ones_like(xb), t_b, jax.random.uniform(jax.random.key(2), (b, 3)))
  per_seq = terms.sum(1)
  mean, se = float(per_seq.mean()), float(per_seq.std() / math.sqrt(b))
  assert abs(mean - exact) < 4 * se, (mean, exact, se)


def test_subs_parameterisation():
  logits = jax.random.normal(jax.random.key(0), (2, 5, V))
  z = jnp.array([[1, MASK, 3, MASK, 9], [MASK] * 5])
  lp = D.subs_log_probs(logits, z, MASK)
  probs = jnp.exp(lp)
  assert float(probs[..., MASK].max()) == 0.0
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(jnp.argmax(lp[0, [0, 2, 4]], -1), z[0, [0, 2, 4]])
  assert float(probs[0, 0, 1]) == 1.0


def test_block_causal_mask_through_gradients():
  cfg, model = _model(block_size=4)
  l, k = 12, 1  # three blocks; look at block 1's loss
  x = jax.random.randint(jax.random.key(0), (1, l), 0, 256)
  z = x.at[:, 4:8].set(MASK)
  emb = model.embed_tokens(jnp.concatenate([z, x], 1))
  positions = jnp.concatenate([jnp.arange(l), jnp.arange(l)])[None]

  def block_loss(emb):
    h, _ = model.backbone(emb, positions, jnp.zeros((1, 2 * l), jnp.int32), attn_mask=D.bd3_mask(l, 4))
    return model.logits(h)[0, 4 * k:4 * k + 4].sum()

  g = jnp.abs(jax.jit(jax.grad(block_loss))(emb))[0].max(-1)
  noisy, clean = g[:l], g[l:]
  assert float(noisy[4:8].min()) > 0 and float(clean[:4].min()) > 0       # own noisy block, earlier clean
  assert float(noisy[:4].max()) == 0 and float(noisy[8:].max()) == 0      # other noisy blocks
  assert float(clean[4:].max()) == 0                                      # own and later clean blocks


def test_bd3_block_1_is_autoregressive():
  cfg, model = _model(block_size=1)
  l = 6
  x = jax.random.randint(jax.random.key(3), (2, l), 0, 256)
  terms, _, _ = D.nelbo_terms(model, cfg, x, jnp.ones_like(x), jnp.ones((2, l)), jnp.zeros((2, l)))  # t=1: all masked
  # The same network run causally on x_<i followed by a <mask> at position i (what follows position i cannot
  # matter under the causal mask): row i of a batch of l sequences answers for position i.
  rows = jnp.where(jnp.eye(l, dtype=bool)[None], MASK, x[:, None, :]).reshape(2 * l, l)
  logits, _ = jax.jit(lambda r: model(r, segment_ids_BL=jnp.zeros_like(r), attn_mask=jnp.tril(jnp.ones((l, l), bool))))(rows)
  lp = D.subs_log_probs(logits, rows, MASK).reshape(2, l, l, -1)
  at_i = lp[:, jnp.arange(l), jnp.arange(l)]                      # (2, l, V): row i, position i
  nll = -jnp.take_along_axis(at_i, x[..., None], -1)[..., 0]
  np.testing.assert_allclose(terms, (1 - cfg.eps) * nll, rtol=1e-4, atol=1e-5)


def test_bd3_block_L_equals_mdlm():
  l = 8
  cfg_m, model = _model()
  cfg_b = _cfg(block_size=l)
  x = jax.random.randint(jax.random.key(4), (3, l), 0, 256)
  t = D.draw_times(jax.random.key(5), (3, 1), cfg_m.eps, True)
  u = jax.random.uniform(jax.random.key(6), (3, l))
  mdlm, _, _ = jax.jit(lambda: D.nelbo_terms(model, cfg_m, x, jnp.ones_like(x), t, u))()
  model_b = nnx.merge(*nnx.split(model))
  model_b.cfg = cfg_b
  bd3, _, _ = jax.jit(lambda: D.nelbo_terms(model_b, cfg_b, x, jnp.ones_like(x), t, u))()
  np.testing.assert_allclose(bd3, mdlm, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(mdlm).sum()) > 0


@pytest.mark.parametrize("sampler,block_size,block_length", [("ancestral", 0, 0), ("confidence", 0, 0),
                                                              ("ancestral", 0, 4), ("confidence", 4, 0)])
def test_samplers_fill_everything_and_keep_fixed_positions(sampler, block_size, block_length):
  _, model = _model(block_size=block_size)
  canvas = jax.random.randint(jax.random.key(7), (2, 16), 0, 256)
  fixed = jax.random.bernoulli(jax.random.key(8), 0.3, (2, 16)).at[:, :4].set(True)
  run = lambda seed: D.infill(model, canvas, fixed, jax.random.key(seed), steps=8, sampler=sampler,
                              block_length=block_length)
  out, calls = run(0)
  assert int((out == MASK).sum()) == 0
  np.testing.assert_array_equal(out[fixed], canvas[fixed])
  np.testing.assert_array_equal(out, run(0)[0])
  assert not np.array_equal(out, run(1)[0])
  assert 1 <= calls <= 8


def test_caching_skips_calls_when_nothing_changes():
  _, model = _model()
  out, calls = D.infill(model, jnp.full((1, 6), MASK), jnp.zeros((1, 6), bool), jax.random.key(0), steps=200)
  assert int((out == MASK).sum()) == 0 and calls < 200  # most of the 200 steps reveal nothing
