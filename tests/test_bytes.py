"""Byte-level families (MegaByte, BLT) and patchers: byte-resolution causality, patching identical in batch and
decode mode, hash n-grams, decode = forward, bits per byte in closed form, and a training run whose loss falls."""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altbench.archs import blt, lm, megabyte, patching
from altbench.train import data, loop, metrics
from altbench.train.config import DataConfig

from conftest import replace, tiny_config

V = 262
SMALL = dict(vocab_size=V, d_model=32, n_heads=2, d_local=16, local_heads=2, d_state=8, ssm_headdim=16, chunk_size=8)
TEXT = b"def f(x, y):\n    return x + y  # sum\n"


def _megabyte(**kw):
  cfg = megabyte.Config(**{**SMALL, "pattern": "A", "local_pattern": "A", "patch_size": 4, **kw})
  return megabyte.build(cfg, nnx.Rngs(0))


def _entropy_lm(vocab=V):
  # init_std 1: a random LM with spread-out entropies, so thresholds cut somewhere in the middle.
  return lm.build(lm.Config(pattern="A", d_model=16, n_heads=2, vocab_size=vocab, init_std=1.0), nnx.Rngs(7))


def _median_entropy(entropy_lm, x):
  return _between(patching.EntropyModel(entropy_lm).entropies(x))


def _blt(x=None, **kw):
  """BLT with entropy patching by a random byte LM, the threshold at the median entropy of x."""
  ent = _entropy_lm(kw.get("vocab_size", V))
  base = dict(SMALL, pattern="A", encoder_pattern="A", decoder_pattern="A", patcher="entropy", max_patch_len=4,
              hash_buckets=64, entropy_threshold=_median_entropy(ent, x) if x is not None else 1.0)
  cfg = blt.Config(**{**base, **kw})
  return blt.build(cfg, nnx.Rngs(0), entropy_model=ent if cfg.patcher == "entropy" else None)


def _text(b, l, seed=0):
  """Rows: a window of TEXT, then random bytes (patching sees both kinds)."""
  text = np.frombuffer(TEXT * 4, np.uint8)[:l].astype(np.int32)
  rows = [text] + [np.asarray(jax.random.randint(jax.random.key(seed + i), (l,), 0, 256)) for i in range(b - 1)]
  return jnp.asarray(np.stack(rows), jnp.int32)


def _logits(model, x):
  """The full forward's logits, compiled once (op-by-op execution is slower on a CPU)."""
  graphdef, state = nnx.split(model)
  out = _forward(graphdef, state, x)
  return out[0] if isinstance(out, tuple) else out


@jax.jit(static_argnums=0)
def _forward(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def _between(values):
  """A threshold in the widest gap between the middle values: no value sits near it (float noise)."""
  v = np.sort(np.asarray(values).ravel())
  lo, hi = len(v) * 3 // 10, len(v) * 7 // 10
  i = lo + int(np.argmax(np.diff(v[lo:hi + 1])))
  return float(0.5 * (v[i] + v[i + 1]))


# ---------------------------------------------------------------- causality at byte resolution, decoding
# One model and one batch per family (module fixtures), so the forward and the decode loop compile once.


def _variants(x_L):
  """Row t replaces bytes t.. of x by others."""
  l = x_L.shape[0]
  later = jnp.arange(l)[None, :] >= jnp.arange(l)[:, None]
  return jnp.where(later, (x_L[None] + 1 + jnp.arange(l)[:, None] * 7) % 256, x_L[None])


@pytest.fixture(scope="module")
def mb_case():
  x = _text(1, 14)[0]  # 14 bytes, P = 4: the last patch is partial
  return _megabyte(pattern="AM"), x, _variants(x)


@pytest.fixture(scope="module")
def blt_case():
  x = _text(1, 18)[0]
  return _blt(x[None], pattern="MA"), x, _variants(x)


def _assert_causal(model, x_L, variants):
  """Changing bytes t.. must not move the logits before t, and must move the logits at t."""
  base = _logits(model, x_L[None])[0]
  out = _logits(model, variants)
  for t in range(x_L.shape[0]):
    np.testing.assert_allclose(out[t, :t], base[:t], atol=2e-5, err_msg=f"bytes >= {t} leak into earlier logits")
    assert float(jnp.abs(out[t, t] - base[t]).max()) > 1e-4, f"position {t} ignores its own input byte"


def test_megabyte_is_causal_at_byte_resolution(mb_case):
  # Positions inside a patch must not see later bytes of that patch, nor later patches.
  _assert_causal(*mb_case)


def test_blt_is_causal_at_byte_resolution(blt_case):
  model, x, variants = blt_case
  _, starts = _forward(*nnx.split(model), variants)
  assert 3 <= int(starts[-1, :-1].sum()) <= 12  # a real mix of patch lengths, not one patch or all bytes
  _assert_causal(model, x, variants)


@pytest.mark.parametrize("case", ["mb_case", "blt_case"])
def test_decode_equals_full_forward_and_greedy_generation_follows_argmax(case, request):
  model, _, variants = request.getfixturevalue(case)
  np.testing.assert_allclose(megabyte.decode_logits(model, variants), _logits(model, variants), atol=1e-4,
                             rtol=1e-4)
  out = megabyte.generate(model, variants[:, :5], variants.shape[1] - 5, jax.random.key(0), temperature=0)
  full = _logits(model, out)  # the same length as in decoding, so the same number of patch slots
  np.testing.assert_array_equal(jnp.argmax(full[:, 4:-1], -1), out[:, 5:])


# ---------------------------------------------------------------- patchers


def _split(x, starts):
  cuts = np.flatnonzero(np.asarray(starts)[: len(x)])
  return [bytes(np.asarray(x)[a:b].astype(np.uint8)) for a, b in zip(cuts, list(cuts[1:]) + [len(x)])]


def test_fixed_patches_are_exactly_p_long():
  x = _text(2, 23)
  starts, capped = patching.Patcher("fixed", size=5).batch(x, max_patches=5)
  for row in range(2):
    assert [len(p) for p in _split(x[row], starts[row])] == [5, 5, 5, 5, 3]
  assert not bool(capped.any())


def test_space_patching_on_a_hand_example():
  x = jnp.asarray(np.frombuffer(b"if a, b:\n    c", np.uint8).astype(np.int32))[None]
  batch = lambda p: _split(x[0], p.batch(x, max_patches=99)[0][0])
  assert batch(patching.Patcher("space")) == [b"if ", b"a,", b" b:", b"\n    c"]
  assert batch(patching.Patcher("space", merge_runs=False)) == [
      b"if ", b"a,", b" ", b"b:", b"\n", b" ", b" ", b" ", b" ", b"c"]
  assert batch(patching.Patcher("space", max_len=2)) == [b"if", b" ", b"a,", b" b", b":", b"\n ", b"  ", b" c"]


@pytest.mark.parametrize("rule", ["global", "relative"])
def test_entropy_patching_same_in_batch_and_decode_mode(rule):
  ent = patching.EntropyModel(_entropy_lm())
  x = _text(3, 40)
  h = ent.entropies(x)
  theta = _between(h) if rule == "global" else _between(jnp.diff(h, axis=1))
  kw = {"threshold": theta} if rule == "global" else {"relative": theta}

  def decode(x, max_len, max_patches):
    p = patching.Patcher("entropy", max_len=max_len, **kw)

    def body(carry, j):
      state, cache = carry
      h_j, cache = ent.step(x[:, j], cache, j)
      state, start, _ = p.step(state, x[:, j], h_j, max_patches)
      return (state, cache), start

    init = (p.init(x.shape[0]), ent.init_cache(x.shape[0], x.shape[1]))
    _, starts = jax.lax.scan(body, init, jnp.arange(x.shape[1]))
    return jnp.concatenate([jnp.ones((x.shape[0], 1), bool), starts.T], 1)

  decode = jax.jit(decode, static_argnums=1)
  for max_len, max_patches in ((5, 40), (5, 9)):
    batch, capped = patching.Patcher("entropy", max_len=max_len, **kw).batch(x, h, max_patches=max_patches)
    np.testing.assert_array_equal(batch, decode(x, max_len, max_patches))
    assert int(batch.sum(1).max()) <= max_patches
    if max_patches == 40:
      assert max(len(p) for row in range(3) for p in _split(x[row], batch[row])) <= max_len
    if max_patches == 9:
      assert bool(capped.any())  # the cap binds here, and decode mode agrees on where
  # Without limits, byte t starts a patch exactly when the entropy of its prediction passes the rule.
  plain, _ = patching.Patcher("entropy", **kw).batch(x, h, max_patches=40)
  rises = h[:, :] > theta if rule == "global" else jnp.diff(h, axis=1, prepend=jnp.inf) > theta
  np.testing.assert_array_equal(plain[:, 1:], rises)


def test_calibrated_threshold_hits_the_target_mean_patch_length():
  ent = patching.EntropyModel(_entropy_lm())
  x = _text(4, 64, seed=3)
  theta = patching.calibrate_threshold(ent, x, 3.0, max_len=8)
  got = patching.mean_patch_len(patching.Patcher("entropy", threshold=theta, max_len=8), x, ent.entropies(x))
  assert abs(got - 3.0) < 0.3, got


# ---------------------------------------------------------------- hash n-grams


def test_ngram_hash_ids_are_deterministic_in_range_and_distinct():
  alphabet = np.array([0, 1, 2, 97, 255, 256])
  trigrams = np.stack(np.meshgrid(alphabet, alphabet, alphabet, indexing="ij"), -1).reshape(-1, 3)
  buckets = 1 << 25  # above the largest trigram value 258 * 263^2 + ...: the ids are injective
  ids = np.asarray(blt.ngram_hash(jnp.asarray(trigrams), 3, buckets))[:, -1]
  assert len(set(ids.tolist())) == len(trigrams)
  x = _text(2, 30)
  for n, b in ((3, 64), (8, 4096)):
    a = np.asarray(blt.ngram_hash(x, n, b))
    np.testing.assert_array_equal(a, np.asarray(blt.ngram_hash(x, n, b)))
    assert a.min() >= 0 and a.max() < b
  # The id at t depends on bytes t-n+1..t only.
  y = x.at[:, 10].set((x[:, 10] + 1) % 256)
  a, b = np.asarray(blt.ngram_hash(x, 4, 1 << 20)), np.asarray(blt.ngram_hash(y, 4, 1 << 20))
  changed = np.flatnonzero((a != b).any(0))
  assert changed.tolist() == [10, 11, 12, 13]


# ---------------------------------------------------------------- bits per byte in closed form


def _uniform(family, vocab):
  """A model of each family whose output head is zero: uniform logits over the vocabulary."""
  if family == "lm":
    model = lm.build(lm.Config(pattern="A", d_model=16, n_heads=2, vocab_size=vocab), nnx.Rngs(0))
  elif family == "megabyte":
    model = _megabyte(vocab_size=vocab)
  else:
    model = _blt(vocab_size=vocab, patcher="space")
  model.head.kernel[...] = jnp.zeros_like(model.head.kernel[...])
  return model


def _loss(family, model, batch):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, batch: family.loss(nnx.merge(graphdef, state), batch, jax.random.key(0)))
  return fn(state, {k: jnp.asarray(v) for k, v in batch.items()})


@pytest.mark.parametrize("family", ["lm", "megabyte", "blt"])
def test_uniform_model_bits_per_byte_in_closed_form(family):
  mod = {"lm": lm, "megabyte": megabyte, "blt": blt}[family]
  # 256 ids (bytes only): exactly 8 bits per byte.
  x = jax.random.randint(jax.random.key(0), (2, 13), 0, 256)
  ones = jnp.ones_like(x)
  batch = {"inputs": x, "targets": jnp.roll(x, -1, 1), "segment_ids": ones, "loss_mask": ones, "nbytes": ones}
  _, m = _loss(mod, _uniform(family, 256), batch)
  assert metrics.bits_per_byte(float(m["nats"]), float(m["bytes"])) == pytest.approx(8.0, rel=1e-6)
  # The byte tokenizer's 262 ids: <eos> targets are scored but carry no bytes, <pad> is masked out.
  tok = data.ByteTokenizer()
  stream = data.token_stream(tok, ["hello world", "x = 1\n", "ok"])
  (batch,) = data.eval_batches(stream, tok, 2, 12)
  _, m = _loss(mod, _uniform(family, V), batch)
  scored, nbytes = int(batch["loss_mask"].sum()), len("hello world" + "x = 1\n" + "ok")
  assert (int(m["tokens"]), int(m["bytes"])) == (scored, nbytes) and scored == nbytes + 2  # two <eos> targets
  assert metrics.bits_per_byte(float(m["nats"]), float(m["bytes"])) == pytest.approx(
      scored * math.log2(V) / nbytes, rel=1e-6)
  if family == "megabyte":  # patches among the scored positions: every 4th of each row (12 positions, 21 scored)
    assert int(m["patches"]) == 3 + 3
  if family == "blt":
    assert 0 < int(m["patches"]) < scored and int(m["patch_capped"]) >= 0


# ---------------------------------------------------------------- training through the loop


def _losses(workdir):
  return [l["loss"] for l in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in l]


def _byte_run(family, model, steps=20):
  cfg = replace(tiny_config(steps=steps, ckpt_every=0, lr=1e-2, warmup_steps=3, batch_size=8),
                data={"seq_len": 32})
  return dataclasses.replace(cfg, family=family, model=model)


def test_megabyte_trains_through_the_loop(tmp_path):
  model = megabyte.Config(**{**SMALL, "vocab_size": 0, "pattern": "A", "local_pattern": "A", "patch_size": 4})
  result = loop.train(_byte_run("megabyte", model), str(tmp_path), log=lambda *a: None)
  losses = _losses(tmp_path)
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1.0, losses
  assert result["eval_bpb"] < 7.0


def test_blt_with_a_trained_entropy_model_trains_through_the_loop(tmp_path):
  # The entropy model: a byte `lm` run directory (config.json and a checkpoint, written as the loop writes
  # them; untrained weights spare a compile), loaded by the loop when BLT is built (blt.frozen_runs), and frozen.
  from altbench.train import checkpoint, config, step
  lm_dir = str(tmp_path / "entropy-lm")
  lm_cfg = tiny_config()
  lm_cfg = dataclasses.replace(lm_cfg, model=dataclasses.replace(lm_cfg.model, vocab_size=V, init_std=0.5))
  os.makedirs(lm_dir)
  metrics.write_json_atomic(os.path.join(lm_dir, "config.json"), {"config": config.to_dict(lm_cfg)})
  ckpt = checkpoint.Checkpointer(lm_dir, 1)
  ckpt.save(1, step.init_state(lm, lm_cfg.model, step.make_optimizer(lm_cfg.train), 0)[1])
  ckpt.close()
  ent = patching.EntropyModel(loop.load_model(lm_dir)[1])
  sample = _text(4, 32, seed=5)
  theta = patching.calibrate_threshold(ent, sample, 4.0, max_len=8)
  model = blt.Config(**{**SMALL, "vocab_size": 0, "pattern": "A", "encoder_pattern": "A", "decoder_pattern": "A",
                        "patcher": "entropy", "patcher_run": lm_dir, "entropy_threshold": theta, "max_patch_len": 8,
                        "hash_buckets": 64})
  workdir = str(tmp_path / "blt")
  result = loop.train(_byte_run("blt", model), workdir, log=lambda *a: None)
  losses = _losses(workdir)
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 1.0, losses
  assert result["eval_bpb"] < 7.0
  # The frozen entropy model is in the checkpoint, unchanged by training.
  _, _, _, graphdef, state, _, _ = loop.load_run(workdir)
  trained = nnx.merge(graphdef, state["params"], state["rest"])
  np.testing.assert_array_equal(trained.entropy.lm.embed.embedding[...], ent.lm.embed.embedding[...])
  assert "entropy" not in state["params"]


# ---------------------------------------------------------------- compressors and analytic FLOPs


def test_compressors_bits_per_byte(tmp_path):
  from altbench.train import compressors, report
  rng = np.random.default_rng(0)
  noise = compressors.bits_per_byte(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
  repeated = compressors.bits_per_byte(b"def f(x):\n    return x\n" * 800)
  assert set(noise) >= {"gzip -9", "bzip2 -9", "xz -9e"}
  assert all(v > 7.9 for v in noise.values()) and all(v < 0.5 for v in repeated.values())
  path = tmp_path / "corpus.txt"
  path.write_text("".join(f"line {i}: {i * i}\n" for i in range(3000)))
  cfg = {"dataset": f"text:{path}", "heldout_fraction": 0.1, "eval_bytes": 4096}
  n, bpb = compressors.compressor_bpb(DataConfig(**cfg))
  assert n == 4096 and 0 < bpb["gzip -9"] < 8
  lines = report.compressor_table([cfg, cfg])
  assert sum("gzip -9" in line for line in lines) == 1 and "Compressors (not models)" in "\n".join(lines)


@pytest.mark.parametrize("scale", ["cpu", "smoke"])
def test_experiment_variants_share_the_byte_transformers_budget(scale):
  # experiments/bytes.py compares byte-level families at equal training FLOPs: every variant of a scale but the
  # entropy model (trained outside the budget) lands within one of its own steps of the byte transformer's.
  import dataclasses
  import os
  import warnings

  from conftest import ROOT

  from altbench.train import arena
  from altbench.train.config import load_module, validate
  exp = load_module(os.path.join(ROOT, "experiments", "bytes.py"))

  def total(arch):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # blt-entropy without a trained entropy model warns and falls back
      cfg = exp.get_config(f"{arch}-{scale}")
    validate(cfg)
    if cfg.data.tokenizer == "bpe":  # the budget counts the BPE vocabulary's head
      cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=cfg.data.bpe_vocab_size))
    per_step = arena.flops_per_step(cfg)
    return per_step * cfg.train.steps, per_step, cfg.data.eval_bytes

  budget, _, eval_bytes = total("byte-transformer")
  assert budget == pytest.approx(exp.sizes(scale)["baseline_steps"] * total("byte-transformer")[1])
  for arch in exp.ARCHS:
    if not arch.startswith("entropy-lm"):
      flops, per_step, n = total(arch)
      assert abs(flops - budget) <= per_step / 2 + 1 and n == eval_bytes, (arch, flops, budget)
