"""interp.capture, interp.lens and interp.patching: names, values, patches and lenses on tiny models of every family."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altbench import archs
from altbench.archs import blt, coconut, diffusion, hooks, lm, megabyte, recurrent
from altbench.interp import capture, lens, patching
from altbench.train import step as train_step
from altbench.train.config import TrainConfig

V, EOS, MASK, BOT, EOT = 262, 256, 258, 259, 260
TINY = dict(d_model=16, n_heads=2, vocab_size=V, d_state=4, ssm_headdim=8, chunk_size=4, init_std=0.3)
BYTES = dict(vocab_size=V, d_model=16, n_heads=2, d_local=16, local_heads=2, d_state=4, ssm_headdim=8, chunk_size=4,
             init_std=0.3)
B, L = 2, 8


def _tokens(seed=0):
  return np.array(jax.random.randint(jax.random.key(seed), (B, L), 97, 123), np.int32)


def _block_names(base, kind, mlp=True, bidirectional=False):
  """The documented names of one block (interp/capture.py's docstring)."""
  names = ["resid_pre", "mixer_out", "resid_post"] + (["resid_mid", "mlp_out"] if mlp else [])
  names += ["attn.z", "attn.pattern"] if kind in "AP" else []
  names += (["ssm.state"] + (["ssm.state_rev"] if bidirectional else [])) if kind in "MP" else []
  names += ["attn.out", "ssm.out"] if kind == "P" else []
  return {f"{base}.{n}" for n in names}


def _backbone_names(prefix, pattern, bidirectional=False):
  names = {prefix + "embed", prefix + "final_norm"}
  for i, kind in enumerate(pattern):
    names |= _block_names(f"{prefix}blocks.{i}", kind, bidirectional=bidirectional)
  return names


# Per family: a tiny model, its inputs, the family's own forward (what `out` must equal), the documented
# names, and the residual stream whose logit lens must give `out` (with the lens name for byte families).
def _lm():
  cfg = lm.Config(pattern="PM", n_kv_heads=1, **TINY)
  return lm.build(cfg, nnx.Rngs(0)), _tokens(), lambda m, x: m(x)[0], _backbone_names("", "PM"), "blocks.1.resid_post"


def _diffusion():
  cfg = diffusion.Config(pattern="M", mask_id=MASK, eos_id=EOS, **TINY)
  x = _tokens()
  x[:, 2:5] = MASK
  ref = lambda m, z: m(z, segment_ids_BL=diffusion._segments(m.cfg, z))[0]
  return diffusion.build(cfg, nnx.Rngs(0)), x, ref, _backbone_names("", "M", bidirectional=True), "blocks.0.resid_post"


def _coconut():
  cfg = coconut.Config(pattern="A", thoughts=2, mask_id=MASK, bot_id=BOT, eot_id=EOT, **TINY)
  x = _tokens()
  x[:, 2], x[:, 3:5], x[:, 5] = BOT, MASK, EOT
  names = _backbone_names("", "A") | _backbone_names("thoughts.", "A") | {"thoughts.vector"}
  return coconut.build(cfg, nnx.Rngs(0)), x, coconut.forward, names, "blocks.0.resid_post"


def _recurrent():
  cfg = recurrent.Config(pattern="AAA", prelude=1, coda=1, test_iters=3, **TINY)
  names = {"embed", "final_norm", "core.state"} | _block_names("prelude.blocks.0", "A")
  names |= _block_names("core.blocks.1", "A") | _block_names("coda.blocks.2", "A")
  ref = lambda m, x: m(x)[0]  # log-probs: compared after a log_softmax of out
  return recurrent.build(cfg, nnx.Rngs(0)), _tokens(), ref, names, "coda.blocks.2.resid_post"


def _megabyte():
  cfg = megabyte.Config(pattern="A", local_pattern="A", patch_size=4, **BYTES)
  names = _backbone_names("global.", "A") | _backbone_names("local.", "A")
  return megabyte.build(cfg, nnx.Rngs(0)), _tokens(), lambda m, x: m(x), names, "local.blocks.0.resid_post"


def _blt():
  cfg = blt.Config(pattern="A", encoder_pattern="A", decoder_pattern="A", patcher="fixed", hash_buckets=16, **BYTES)
  names = {"patch_starts", "encoder.final_norm", "decoder.final_norm"} | _backbone_names("global.", "A")
  names |= _block_names("encoder.blocks.0", "A") | _block_names("decoder.blocks.0", "A")
  return blt.build(cfg, nnx.Rngs(0)), _tokens(), lambda m, x: m(x)[0], names, "decoder.blocks.0.resid_post"


CASES = {"lm": _lm, "diffusion": _diffusion, "coconut": _coconut, "recurrent": _recurrent, "megabyte": _megabyte,
         "blt": _blt}


REIMPLEMENTED = ("coconut", "recurrent")  # drivers passing options to the family's loop (others call the model)


@functools.lru_cache(maxsize=None)
def _full_run(family):
  """(model, inputs, out, cache) of run_with_cache with every name, shared by the tests (one compile each)."""
  model, x, *_ = CASES[family]()
  out, cache = capture.run_with_cache(model, x)
  return model, x, out, cache


@pytest.mark.parametrize("family", sorted(archs.FAMILIES))
def test_capture_names_values_and_lens_for_every_family(family):
  assert family in CASES, f"family {family!r} has no capture test case (and maybe no interp.capture driver)"
  _, _, reference, expected, last = CASES[family]()
  model, x, out, cache = _full_run(family)
  assert capture.family_of(model) == family
  assert set(cache) == expected, (sorted(set(cache) - expected), sorted(expected - set(cache)))
  lensed = lens.to_output_layout(model, last, lens.logit_lens(model, cache[last], last), out.shape)
  if family == "recurrent":
    out, lensed = jax.nn.log_softmax(out), jax.nn.log_softmax(lensed)
  np.testing.assert_allclose(lensed, out, atol=2e-5, rtol=1e-5)  # the logit lens of the last layer is the output
  if family in REIMPLEMENTED:
    graphdef, state = nnx.split(model)
    ref = jax.jit(lambda state, x: reference(nnx.merge(graphdef, state), x))(state, x)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
  if family == "coconut":  # the final pass's embed holds every thought, as written by its pass
    assert cache["thoughts.blocks.0.resid_post"].shape == (2, B, L, 16)
    np.testing.assert_array_equal(cache["embed"][:, 3:5], jnp.moveaxis(cache["thoughts.vector"], 0, 1))
  if family == "recurrent":
    assert cache["core.blocks.1.resid_post"].shape == (3, B, L, 16)
    np.testing.assert_array_equal(cache["core.state"][-1], cache["coda.blocks.2.resid_pre"])
  if family == "megabyte":
    assert cache["local.embed"].shape == (B * L // 4, 4, 16) and cache["global.embed"].shape == (B, L // 4, 16)


def test_diffusion_sampler_steps():
  model, x, *_ = _diffusion()
  tokens, cache = capture.run_with_cache(model, x, names=["steps.canvas", "steps.blocks.0.ssm.state_rev"], steps=3)
  canvas = np.asarray(cache["steps.canvas"])
  assert canvas.shape == (3, B, L) and cache["steps.blocks.0.ssm.state_rev"].shape[:3] == (3, B, L)
  np.testing.assert_array_equal(canvas[0], x)
  masked = (canvas == MASK).sum(axis=(1, 2))
  assert masked[0] == 6 and masked[0] > masked[1] > masked[2] > 0 and not np.any(np.asarray(tokens) == MASK)
  np.testing.assert_array_equal(np.asarray(tokens)[x != MASK], x[x != MASK])


def test_one_block_by_hand_and_self_patches():
  """Cached values equal norm -> mixer -> residual -> mlp recomputed for one block; patching the attention
  pattern or the SSM states with their own values (which recomputes the heads from pattern @ v and the scan
  output from C h + D x) changes nothing, so the pattern and the states are the ones the model uses."""
  model, x, out, cache = _full_run("lm")
  graphdef, state = nnx.split(model)

  @jax.jit
  def by_hand(state, h, last):
    m = nnx.merge(graphdef, state)
    block, pos = m.backbone.blocks[0], jnp.broadcast_to(jnp.arange(L), (B, L))
    mixer = block.mixer(block.mixer_norm(h), pos)[0]
    mid = h + mixer
    mlp = block.mlp(block.mlp_norm(mid))
    return {"mixer_out": mixer, "resid_mid": mid, "mlp_out": mlp, "resid_post": mid + mlp,
            "final_norm": m.backbone.final_norm(last)}

  h = cache["blocks.0.resid_pre"]
  np.testing.assert_array_equal(h, cache["embed"])
  for name, want in by_hand(state, h, cache["blocks.1.resid_post"]).items():
    np.testing.assert_allclose(cache[name if name == "final_norm" else f"blocks.0.{name}"], want, atol=1e-5,
                               rtol=1e-5)
  np.testing.assert_allclose(cache["blocks.0.attn.out"] + cache["blocks.0.ssm.out"], cache["blocks.0.mixer_out"],
                             atol=1e-6)
  np.testing.assert_allclose(cache["blocks.0.attn.pattern"].sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(np.asarray(cache["blocks.0.attn.pattern"]), 1) == 0)  # causal

  # Block 0's own pattern and states change nothing; noise in block 1's state at position t changes that
  # block's output at t and after (the recurrence runs on from it), not before.
  t = 4
  noise = jax.random.normal(jax.random.key(3), cache["blocks.1.ssm.state"].shape)
  patches = {"blocks.0.attn.pattern": cache["blocks.0.attn.pattern"], "blocks.0.ssm.state": cache["blocks.0.ssm.state"],
             "blocks.1.ssm.state": capture.at(noise, t)}
  names = ["blocks.0.mixer_out", "blocks.1.mixer_out", "blocks.1.ssm.state"]
  _, got = capture.run_with_cache(model, x, names=names, patches=patches)
  np.testing.assert_allclose(got["blocks.0.mixer_out"], cache["blocks.0.mixer_out"], atol=1e-5, rtol=1e-5)
  diff = np.abs(np.asarray(got["blocks.1.mixer_out"] - cache["blocks.1.mixer_out"])).max(axis=(0, 2))
  assert np.all(diff[:t] < 1e-5) and np.all(diff[t:] > 1e-2), diff
  np.testing.assert_array_equal(got["blocks.1.ssm.state"][:, t], noise[:, t])


@pytest.mark.parametrize("family", ["lm", "recurrent"])
def test_patching_all_clean_activations_restores_clean_and_own_changes_nothing(family):
  model, clean, clean_out, clean_cache = _full_run(family)
  corrupt = clean.copy()
  corrupt[:, 2] = (corrupt[:, 2] - 97 + 5) % 26 + 97
  corrupt_out, corrupt_cache = capture.run_with_cache(model, corrupt)  # the same compiled program as clean's
  assert np.abs(np.asarray(clean_out - corrupt_out)).max() > 1e-3
  np.testing.assert_allclose(capture.run_with_patches(model, corrupt, clean_cache), clean_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(capture.run_with_patches(model, corrupt, corrupt_cache), corrupt_out, atol=1e-5, rtol=1e-5)
  # One residual stream at every position (every step for the core) is enough: what follows reads only it.
  name = {"lm": "blocks.1.resid_pre", "recurrent": "core.blocks.1.resid_pre"}[family]
  np.testing.assert_allclose(capture.run_with_patches(model, corrupt, {name: clean_cache[name]}), clean_out,
                             atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="no such activation"):
    capture.run_with_patches(model, corrupt, {"blocks.9.resid_pre": clean_cache[name]})


def test_patching_sweep_effects_and_heatmap(tmp_path):
  model = lm.build(lm.Config(pattern="AA", **TINY), nnx.Rngs(1))  # attention only: a cheap compile
  clean = _tokens()
  corrupt = clean.copy()
  corrupt[:, 2] = (corrupt[:, 2] - 97 + 5) % 26 + 97
  metric = lambda o: patching.logit_diff(o, L - 1, jnp.array([97, 98]), jnp.array([99, 100]))
  # Before any mixing only the changed position matters; the last stream at the read-out position is all.
  want = {"blocks.0.resid_pre": np.eye(L)[2], "blocks.1.resid_post": np.eye(L)[-1]}
  for direction, names in [("denoise", ["blocks.0.resid_pre"]), ("noise", ["blocks.1.resid_post"])]:
    effects, m_clean, m_corrupt = patching.sweep(model, clean, corrupt, metric, names, direction=direction)
    assert abs(m_clean - m_corrupt) > 1e-2
    for name in names:  # noising undoes at exactly the sites where denoising restores
      np.testing.assert_allclose(effects[name], want[name] if direction == "denoise" else 1 - want[name], atol=1e-4)
  path = patching.heatmap(effects, tmp_path / "patch.png", title="noise")
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_tuned_lens_starts_as_logit_lens_and_training_lowers_kl():
  model, x, out, cache = _full_run("lm")
  names = ["blocks.0.resid_post"]
  params = lens.init_tuned_lens(16, names)
  h = cache[names[0]]
  np.testing.assert_array_equal(lens.tuned_lens(model, params, names[0], h), lens.logit_lens(model, h))
  batches = [np.array(jax.random.randint(jax.random.key(i), (8, L), 97, 123), np.int32) for i in range(1, 5)]
  params, losses = lens.fit_tuned_lens(model, batches, names, steps=30, lr=1e-2)
  before = lens.kl_to_final(out, lens.logit_lens(model, h))
  after = lens.kl_to_final(out, lens.tuned_lens(model, params, names[0], h))  # held-out inputs x
  assert losses[-1] < 0.7 * losses[0] and after < 0.9 * before, (losses[0], losses[-1], before, after)


def test_readout_terms_sum_to_the_logit_lens_logit_of_the_queried_token():
  model, x, out, cache = _full_run("lm")
  h = cache["blocks.0.resid_post"].reshape(-1, 16)
  ids = np.random.default_rng(0).integers(0, 262, len(h))
  terms = lens.readout_terms(model, h, ids)
  want = lens.logit_lens(model, h)[np.arange(len(h)), ids]
  np.testing.assert_allclose(np.asarray(terms.sum(-1)), np.asarray(want), rtol=1e-4, atol=1e-4)
  normed = lens.readout_terms(model, model.backbone.final_norm(h), ids, normed=True)
  np.testing.assert_allclose(np.asarray(normed), np.asarray(terms), rtol=1e-5, atol=1e-6)


def test_byte_lens_rejects_global_states():
  model, *_ = _megabyte()
  with pytest.raises(ValueError, match="local"):
    lens.logit_lens(model, jnp.zeros((1, 2, 16)), "global.blocks.0.resid_post")


def test_capture_off_train_step_is_the_same_program():
  """With no tap active the taps add nothing: the train step lowers to the very program it lowers to with the
  taps stubbed out (so its outputs are bitwise the same and its XLA cost analysis FLOPs equal)."""
  family = archs.get_family("lm")
  tcfg = TrainConfig(steps=4, warmup_steps=1)
  tx = train_step.make_optimizer(tcfg)
  graphdef, state = train_step.init_state(family, lm.Config(pattern="PM", **TINY), tx, 0)
  x = _tokens()[None]
  ones = np.ones_like(x)
  batch = {"inputs": x, "targets": x, "segment_ids": ones, "loss_mask": ones, "nbytes": ones}

  def lowered():
    return jax.jit(train_step.make_train_step(family, graphdef, tx, tcfg)).lower(state, batch, jax.random.key(0))

  real = lowered()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(hooks, "tap", lambda module, name, value: value)
    mp.setattr(hooks, "wants", lambda module, name: False)
    mp.setattr(hooks, "replaces", lambda module, name: False)
    stub = lowered()
  assert real.as_text() == stub.as_text()
  cost = lambda low: (c[0] if isinstance(c := low.cost_analysis(), (list, tuple)) else c)["flops"]
  assert cost(real) == cost(stub) > 0


@pytest.mark.parametrize("cot", ["path", "frontier"])
def test_reach_counterfactual_flips_the_answer(cot):
  from altbench.train import reasoning_tasks as rt
  found = 0
  for seed in range(20):
    ex = rt.reach(np.random.default_rng(seed), size=12, depth=3, cot=cot)
    cf = patching.reach_counterfactual(ex)
    if cf is None:
      continue
    found += 1
    assert rt.check_reach(cf) == [], (ex, cf)  # the task's own checker: one reachable candidate, a shortest path
    assert cf.steps == rt.reach_steps(cf.intermediates["path"], cf.intermediates["frontier"], cot)
    assert cf.answer == ex.intermediates["distractor"] and cf.intermediates["distractor"] == ex.answer
    diff = [i for i, (a, b) in enumerate(zip(ex.question, cf.question)) if a != b]
    start = ex.question.index("|") + 1  # only the start node's two bytes change
    assert len(cf.question) == len(ex.question) and diff and set(diff) <= {start, start + 1}
  assert found >= 10
