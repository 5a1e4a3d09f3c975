"""The Gated DeltaNet mixer ("G"): the layer against a float64 numpy transcription of the paper's equations,
its init, its config errors. Causality, decode = forward, packing and bidirectional mode are checked with the
other recurrent mixers in test_mamba2.py."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from altbench.archs import lm

SMALL = dict(vocab_size=262, d_model=32, n_heads=2, chunk_size=4, d_conv=3)


def _mixer(**kw):
  cfg = lm.Config(**{**SMALL, "pattern": "G", **kw})
  return cfg, lm.build(cfg, nnx.Rngs(3)).backbone.blocks[0].mixer


def _numpy_layer(m, x_LD, eps):
  """One sequence through the layer, token by token in float64, from its parameters alone."""
  p = lambda a: np.asarray(a[...], np.float64)
  h, dk, dv = m.heads, m.dk, m.dv
  proj = x_LD @ p(m.in_proj.kernel)
  qkv, gate, b_in, a_in = np.split(proj, [h * (2 * dk + dv), h * (2 * dk + 2 * dv), h * (2 * dk + 2 * dv) + h],
                                   axis=1)
  kernel, bias = p(m.conv_kernel), p(m.conv_bias)
  width = kernel.shape[0]
  padded = np.concatenate([np.zeros((width - 1, qkv.shape[1])), qkv])
  conv = np.stack([(padded[t:t + width] * kernel).sum(0) + bias for t in range(len(x_LD))])
  conv = conv / (1 + np.exp(-conv))  # silu
  q, k, v = np.split(conv, [h * dk, 2 * h * dk], axis=1)
  q, k, v = q.reshape(-1, h, dk), k.reshape(-1, h, dk), v.reshape(-1, h, dv)
  q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
  k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
  beta = 1 / (1 + np.exp(-b_in))
  g = -np.exp(p(m.A_log)) * np.log1p(np.exp(a_in + p(m.dt_bias)))
  S = np.zeros((h, dk, dv))
  out = []
  for t in range(len(x_LD)):
    o = np.zeros((h, dv))
    for i in range(h):
      S[i] *= np.exp(g[t, i])
      S[i] += np.outer(k[t, i], beta[t, i] * (v[t, i] - S[i].T @ k[t, i]))
      o[i] = S[i].T @ q[t, i] / np.sqrt(dk)
    o = o / np.sqrt((o * o).mean(-1, keepdims=True) + eps)  # RMSNorm per head, then the gate
    o = o.reshape(-1) * p(m.norm.scale) * gate[t] / (1 + np.exp(-gate[t]))
    out.append(o @ p(m.out_proj.kernel))
  return np.stack(out)


@pytest.mark.parametrize("kw", [{}, dict(gdn_heads=4, gdn_head_dim=6, gdn_expand_v=1)])
def test_layer_matches_the_papers_equations(kw):
  cfg, m = _mixer(**kw)
  x = jax.random.normal(jax.random.key(0), (1, 11, cfg.d_model))  # 11: not a multiple of the chunk
  out, _ = m(x, None)
  np.testing.assert_allclose(np.asarray(out[0]), _numpy_layer(m, np.asarray(x[0], np.float64), cfg.norm_eps),
                             rtol=2e-4, atol=2e-5)


def test_shapes_and_init():
  cfg, m = _mixer(gdn_heads=4, gdn_head_dim=8, gdn_expand_v=3)
  assert (m.heads, m.dk, m.dv) == (4, 8, 24)
  A = np.exp(np.asarray(m.A_log[...]))
  dt = np.asarray(jax.nn.softplus(m.dt_bias[...]))
  assert A.min() > 0 and A.max() <= 16
  assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
  assert m.in_proj.kernel.shape == (32, 4 * (8 + 8 + 24 + 24) + 2 * 4)


@pytest.mark.parametrize("field,value,needle", [("gdn_impl", "triton", "gdn_impl='triton'"),
                                                ("gdn_expand_v", 0, "gdn_expand_v=0"),
                                                ("gdn_heads", 64, "gdn_heads=64"),
                                                ("gdn_head_dim", -1, "gdn_head_dim=-1")])
def test_bad_fields_are_named(field, value, needle):
  cfg = dataclasses.replace(lm.Config(**{**SMALL, "pattern": "GA"}), **{field: value})
  with pytest.raises(ValueError, match=needle):
    cfg.validate()
