"""Mamba-2, Gated DeltaNet and hybrid backbones: causality per pattern, bidirectional mode, decode = forward,
packing, init."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altbench.archs import lm

SMALL = dict(vocab_size=262, d_model=64, n_heads=4, d_state=16, ssm_headdim=16, chunk_size=8)


def _model(pattern, **kw):
  cfg = lm.Config(**{**SMALL, "pattern": pattern, **kw})
  return cfg, lm.build(cfg, nnx.Rngs(0))


def _grad_wrt_inputs(model, l, t):
  emb = model.embed(jax.random.randint(jax.random.key(0), (1, l), 0, 256))

  def out_at_t(emb):
    h, _ = model.backbone(emb, jnp.arange(l)[None])
    return model.logits(h)[0, t].sum()

  return jnp.abs(jax.grad(out_at_t)(emb))[0].max(axis=-1)


@pytest.mark.parametrize("pattern", ["M", "P", "MAM", "MP", "G", "GGA"])
def test_causal_through_gradients(pattern):
  _, model = _model(pattern)
  g = _grad_wrt_inputs(model, 19, 9)  # 19: not a multiple of the chunk size
  assert float(g[10:].max()) == 0.0
  assert float(g[:10].min()) > 0.0


@pytest.mark.parametrize("pattern", ["M", "P", "MA", "G"])
def test_bidirectional_sees_the_future(pattern):
  _, model = _model(pattern, causal=False)
  g = _grad_wrt_inputs(model, 19, 9)
  assert float(g[10:].min()) > 0.0 and float(g[:9].min()) > 0.0


@pytest.mark.parametrize("pattern,mlp,groups", [("MM", False, 1), ("MAMA", True, 2), ("PM", True, 1), ("GGA", True, 1)])
def test_decode_with_states_equals_full_forward(pattern, mlp, groups):
  cfg, model = _model(pattern, mlp=mlp, ssm_ngroups=groups)
  tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, 256)
  full, _ = model(tokens)
  cache = lm.backbone.init_cache(cfg, 2, 21)
  logits, cache = model(tokens[:, :11], cache=cache, cache_index=0)  # prefill by the chunked scan
  steps = [logits]
  decode = jax.jit(lambda token, cache, i: model(token, cache=cache, cache_index=i))
  for i in range(11, 21):
    logits, cache = decode(tokens[:, i:i + 1], cache, i)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)
  out = lm.generate(model, tokens[:, :5], 6, jax.random.key(0), temperature=0)
  again, _ = model(out[:, :-1])
  np.testing.assert_array_equal(jnp.argmax(again[:, 4:], -1), out[:, 5:])


@pytest.mark.parametrize("pattern", ["M", "P", "G"])
def test_packed_documents_do_not_leak_through_conv_or_state(pattern):
  _, model = _model(pattern)
  tokens = jax.random.randint(jax.random.key(2), (1, 20), 0, 256)
  seg = jnp.array([[3] * 7 + [4] * 13])
  packed, _ = model(tokens, segment_ids_BL=seg)
  alone, _ = model(tokens[:, 7:], positions_BL=jnp.arange(7, 20)[None])
  np.testing.assert_allclose(packed[:, 7:], alone, atol=1e-4)


@pytest.mark.parametrize("pattern,causal", [("M", True), ("P", True), ("M", False), ("G", True), ("G", False)])
def test_no_segment_ids_is_one_document_per_row(pattern, causal):
  # without segment ids the conv and the scan skip their document masks; the result must not change
  _, model = _model(pattern, causal=causal)
  tokens = jax.random.randint(jax.random.key(3), (2, 19), 0, 256)
  with_ids, _ = model(tokens, segment_ids_BL=jnp.full((2, 19), 5))
  without, _ = model(tokens)
  np.testing.assert_allclose(without, with_ids, atol=1e-5)


def test_init_follows_the_paper():
  cfg, model = _model("M", ssm_headdim=8)
  mixer = model.backbone.blocks[0].mixer
  A = np.exp(np.asarray(mixer.A_log[...]))
  dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
  assert A.min() >= 1 and A.max() <= 16
  assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
  np.testing.assert_array_equal(np.asarray(mixer.D[...]), 1.0)
  assert model.backbone.blocks[0].mlp is not None and _model("M", mlp=False)[1].backbone.blocks[0].mlp is None


def test_no_weight_decay_on_ssm_vectors():
  from altbench.train import step
  from altbench.train.config import TrainConfig
  cfg, model = _model("M")
  params = nnx.state(model, nnx.Param)
  tx = step.make_optimizer(TrainConfig(lr=0.1, weight_decay=0.5, grad_clip=0.0, warmup_steps=0, steps=10))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  mixer = updates["backbone"]["blocks"][0]["mixer"]
  for name in ("A_log", "D", "dt_bias"):
    assert float(jnp.abs(mixer[name][...]).max()) == 0.0  # zero gradient and no decay -> no update
  assert float(jnp.abs(mixer["in_proj"]["kernel"][...]).max()) > 0.0


def test_scan_reads_activations_in_the_compute_dtype(monkeypatch):
  # float32 operands would put the GPU kernels' dots at HIGHEST precision, off the bf16 matrix units.
  from altbench.archs import mamba2
  seen = {}
  real = mamba2.kernels.ssd

  def spy(x, dt, A, B, C, *a, **k):
    seen.update(x=x.dtype, B=B.dtype, C=C.dtype)
    return real(x, dt, A, B, C, *a, **k)

  monkeypatch.setattr(mamba2.kernels, "ssd", spy)
  _, model = _model("M", dtype="bfloat16")
  model(jnp.zeros((1, 16), jnp.int32))
  assert seen == {"x": jnp.bfloat16, "B": jnp.bfloat16, "C": jnp.bfloat16}


def test_config_impls_reach_the_pallas_kernels_and_match_xla():
  # Part 4 of the kernels issue: a config's attn_impl / ssm_impl alone puts a model on the Pallas kernels
  # (interpreted on CPU); logits and parameter gradients equal the XLA paths', packed documents included.
  tokens = jax.random.randint(jax.random.key(4), (1, 40), 0, 256)
  seg = jnp.array([[1] * 15 + [2] * 25])

  def loss_and_grads(impl):
    _, model = _model("MP", attn_impl=impl, ssm_impl=impl)
    graphdef, params = nnx.split(model)

    def loss(params):
      logits, _ = nnx.merge(graphdef, params)(tokens, segment_ids_BL=seg)
      return jnp.mean(logits ** 2), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    jaxpr = str(jax.make_jaxpr(lambda p: loss(p)[0])(params))
    return logits, grads, jaxpr

  logits_p, grads_p, jaxpr_p = loss_and_grads("pallas")
  logits_x, grads_x, jaxpr_x = loss_and_grads("xla")
  assert jaxpr_p.count("pallas_call") >= 2 and "pallas_call" not in jaxpr_x  # the SSD and flash attention
  np.testing.assert_allclose(logits_p, logits_x, rtol=1e-4, atol=1e-4)
  for (path, g_p), g_x in zip(jax.tree_util.tree_leaves_with_path(grads_p), jax.tree.leaves(grads_x)):
    np.testing.assert_allclose(g_p, g_x, rtol=1e-3, atol=1e-5, err_msg=jax.tree_util.keystr(path))
