"""The family contract (archs.Family, checked by get_family), the layering of archs, and the stepped forwards
that interp reaches through (coconut's thoughts, recurrent depth's states): one loop each, with `intervene`."""

import ast
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altbench import archs
from altbench.archs import coconut, recurrent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(d_model=16, n_heads=2, vocab_size=262, init_std=0.3)
MASK, BOT, EOT = 258, 259, 260


@pytest.mark.parametrize("name", sorted(archs.FAMILIES))
def test_every_registered_family_is_a_family(name):
  family = archs.get_family(name)
  assert isinstance(family, archs.Family)
  assert all(callable(getattr(family, a)) for a in archs.REQUIRED)


def test_a_module_without_loss_is_refused_naming_it(monkeypatch):
  lm = archs.get_family("lm")
  fake = types.ModuleType("fake_family")
  for a in archs.REQUIRED:
    if a != "loss":
      setattr(fake, a, getattr(lm, a))
  monkeypatch.setitem(sys.modules, "fake_family", fake)
  monkeypatch.setitem(archs.FAMILIES, "fake", "fake_family")
  with pytest.raises(TypeError, match=r"family 'fake' \(fake_family\).*\['loss'\] missing"):
    archs.get_family("fake")
  fake.loss = lm.loss
  assert archs.get_family("fake") is fake
  fake.check_data = "not a function"  # an optional attribute, when present, must be callable
  with pytest.raises(TypeError, match="check_data"):
    archs.get_family("fake")


def test_archs_imports_neither_train_nor_interp():
  """DESIGN.md: data flows one way; a family gets what it needs of the data (check_data's layout) passed in."""
  folder = os.path.join(ROOT, "archs")
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(folder, name)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
              [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      for mod in mods:
        assert not mod.startswith(("altbench.train", "altbench.interp")), f"archs/{name}:{node.lineno} imports {mod}"


def test_coconut_check_data_reads_the_layout_it_is_given():
  cfg = coconut.Config(**TINY, thoughts=3, prefix_len=7)
  lay = types.SimpleNamespace(mode="coconut", thoughts=2, max_stage=2, prefix_len=7)
  with pytest.raises(ValueError, match="thoughts=3: .* 4 thoughts"):
    coconut.check_data(cfg, lay)
  coconut.check_data(cfg, types.SimpleNamespace(mode="cot", thoughts=2, max_stage=2, prefix_len=9))
  coconut.check_data(cfg, None)  # not a reasoning task
  with pytest.raises(ValueError, match="prefix_len=7: the data puts <bot> at index 8"):
    coconut.check_data(cfg, types.SimpleNamespace(mode="coconut", thoughts=1, max_stage=3, prefix_len=9))


def _coconut_case(prefix_len):
  """A model whose rows read 3 tokens, <bot> at index 3, 3 thoughts, <eot> and 2 tokens."""
  cfg = coconut.Config(pattern="AA", **TINY, thoughts=3, prefix_len=prefix_len, mask_id=MASK, bot_id=BOT,
                       eot_id=EOT)
  tokens = np.array(jax.random.randint(jax.random.key(1), (2, 10), 97, 123), np.int32)
  tokens[:, 3], tokens[:, 4:7], tokens[:, 7] = BOT, MASK, EOT
  return coconut.build(cfg, nnx.Rngs(0)), jnp.asarray(tokens)


@pytest.mark.parametrize("prefix_len", [0, 4])
def test_intervening_on_a_thought_is_writing_it_into_the_input(prefix_len):
  """intervene replacing thought 1 gives what the input with that vector at thought 1's slot (no longer a
  thought) gives: the later thoughts are computed from it, in either scheme."""
  model, tokens = _coconut_case(prefix_len)
  vec = jax.random.normal(jax.random.key(2), (2, 16))
  seen = []

  def swap(i, v):
    seen.append(v.shape)
    return jnp.where(i == 1, vec, v)

  got = nnx.jit(lambda m, t: coconut.forward(m, t, intervene=swap))(model, tokens)
  x = model.embed_tokens(tokens).at[:, 5].set(vec)
  latent = (tokens == MASK).at[:, 5].set(False)
  want = nnx.jit(coconut.forward_embeddings)(model, x, latent)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  assert seen and set(seen) == {(2, 16)}
  plain = nnx.jit(coconut.forward)(model, tokens)
  assert not np.allclose(got[:, 6:], plain[:, 6:], atol=1e-3)  # the intervention reaches the later positions
  np.testing.assert_allclose(got[:, :5], plain[:, :5], atol=2e-5, rtol=1e-5)  # and not the earlier ones


def test_recurrent_intervene_replaces_the_state_after_that_iteration():
  """Replacing s_1 by s' and running on to r = 3 is running 2 iterations from s' (a closed form of the loop)."""
  model = recurrent.build(recurrent.Config(pattern="AAA", **TINY), nnx.Rngs(0))
  x = model.embed_tokens(jnp.asarray(np.arange(16).reshape(2, 8) + 97))
  s0 = recurrent.initial_state(model.cfg, jax.random.key(0), x.shape)
  s_new = recurrent.initial_state(model.cfg, jax.random.key(5), x.shape)
  run = nnx.jit(recurrent.run_fixed, static_argnames=("intervene",))
  swap = lambda i, s: jnp.where(i == 0, s_new, s)
  got_logits, got_s = run(model, x, 3, s0, intervene=swap)
  want_logits, want_s = run(model, x, 2, s_new)
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(got_s, want_s, atol=2e-5, rtol=1e-5)
  logp, count = nnx.jit(recurrent.run_test, static_argnums=2)(model, x, 3, s0)  # the eval path: the same loop
  np.testing.assert_allclose(logp, jax.nn.log_softmax(run(model, x, 3, s0)[0]), atol=2e-5, rtol=1e-5)
  assert (np.asarray(count) == 3).all()
