"""Reasoning tasks, Coconut and recurrent depth: independent answer checks, layouts and loss masks, thought passes
against a hand-unrolled loop, the plain stack as a special case of recurrent depth, truncated backprop,
causality through gradients, and a short run through the loop whose loss falls."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altbench.archs import coconut, lm, recurrent
from altbench.train import reasoning_tasks as rt
from altbench.train.config import Config, ConfigError, DataConfig, TrainConfig, validate

TINY = dict(d_model=32, n_heads=2, vocab_size=262, d_state=8, ssm_headdim=8, chunk_size=8)
IDS = rt.SPECIAL_IDS


def _data(task="reach", **kw):
  base = {"reach": dict(task_size=10, task_depth=3, seq_len=96), "mult": dict(task_size=2, seq_len=40),
          "vartrack": dict(task_size=6, task_depth=3, seq_len=64),
          "countdown": dict(task_size=5, task_depth=4, seq_len=96),
          "plan": dict(task_size=7, task_depth=2, seq_len=128)}[task]
  return DataConfig(dataset=task, **{"eval_examples": 16, **base, **kw})


def _jnp(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _compiled(fn):
  """fn(model, *args), compiled once per model structure (eager NNX is slow on a shared CPU)."""
  run = jax.jit(lambda graphdef, state, *args: fn(nnx.merge(graphdef, state), *args), static_argnums=0)
  return lambda model, *args: run(*nnx.split(model), *args)


def _jit(fn, model):
  compiled = _compiled(fn)
  return lambda *args: compiled(model, *args)


def _grads(fn, model):
  """Parameter gradients of the scalar fn(model), compiled."""
  graphdef, state = nnx.split(model)
  return jax.jit(jax.grad(lambda state: fn(nnx.merge(graphdef, state))))(state)


# ----------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("task,cot", [(t, c) for t in sorted(rt.GENERATORS) for c in rt.COTS[t]])
def test_answers_and_steps_pass_an_independent_checker(task, cot):
  corpus = rt.ReasoningCorpus(_data(task, eval_examples=60, task_cot=cot))
  examples = corpus.eval_examples() + corpus.train_examples(3, 0, 60)
  for ex in examples:
    assert rt.CHECKERS[task](ex) == [], ex
  ex = examples[0]
  wrong = "".join(chr((ord(c) - 97 + 1) % 26 + 97) if c.isalpha() else str((int(c) + 1) % 10) if c.isdigit() else c
                  for c in ex.answer)  # countdown's operators stay
  assert rt.CHECKERS[task](dataclasses.replace(ex, answer=wrong))  # the checker can fail
  assert rt.CHECKERS[task](dataclasses.replace(ex, steps=ex.steps[:-1] + (ex.steps[0],)))


def test_intermediates_are_the_ground_truth():
  for ex in rt.ReasoningCorpus(_data("reach")).eval_examples():
    assert ex.intermediates["path"] == [s[1:] for s in ex.steps]
    for node, frontier in zip(ex.intermediates["path"], ex.intermediates["frontier"]):
      assert node in frontier  # the path node is in the BFS frontier of its step
    assert ex.intermediates["distractor"] in ex.question and ex.intermediates["distractor"] != ex.answer
  for ex in rt.ReasoningCorpus(_data("mult")).eval_examples():
    a, b = (int(x[::-1]) for x in ex.question.split("*"))
    sums = [int("".join(map(str, d))[::-1]) for d in ex.intermediates["running_sum_digits"]]
    assert sums == [a * (b % 10 ** j) for j in range(1, len(sums) + 1)]
  vartrack = rt.ReasoningCorpus(_data("vartrack", eval_examples=64)).eval_examples()
  assert {len(ex.steps) for ex in vartrack} == {1, 2, 3}  # chains of every length up to task_depth=3
  for ex in vartrack:
    env = {}
    for stmt in ex.question.split("?")[0].split(","):
      var, expr = stmt.split("=")
      env[var] = eval(expr, {}, dict(env)) % 10  # direct evaluation of "b+3" etc.
    assert ex.intermediates["values"] == list(env.items())
    assert str(env[ex.question[-1]]) == ex.answer


def test_reach_frontier_cot_is_the_bfs_layers_of_the_same_question():
  path, front = (rt.ReasoningCorpus(_data("reach", eval_examples=40, task_cot=c)) for c in ("path", "frontier"))
  assert path.layout.cot == "path" and front.layout.cot == "frontier"
  several = 0
  for a, b in zip(path.eval_examples(), front.eval_examples()):
    assert (a.question, a.answer, a.intermediates) == (b.question, b.answer, b.intermediates)  # only the steps differ
    assert len(b.steps) == len(a.steps) and b.steps[-1].count(b.answer) == 1  # the last layer holds the answer
    for node, step in zip(a.intermediates["path"], b.steps):
      assert node in step  # each path node in its own layer
    several += any(len(s) > 2 for s in b.steps)
  assert several > 20  # most questions have a layer of more than one node (else the two forms coincide)
  # Every frontier CoT fits the layout's bound (encode_rows asserts that each example fits its window).
  lay = front.layout
  rt.encode_rows(front.train_examples(0, 0, 200), dataclasses.replace(lay, mode="cot"), lay.window - 1, 0)
  with pytest.raises(ValueError, match="task_cot='frontier'.*mult"):
    rt.layout(_data("mult", task_cot="frontier"))


def test_deterministic_and_train_test_disjoint():
  corpus = rt.ReasoningCorpus(_data("mult"))
  a, b = corpus.train_batch(1, 5, 4, 40), corpus.train_batch(1, 5, 4, 40)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["inputs"], corpus.train_batch(1, 6, 4, 40)["inputs"])
  again = rt.ReasoningCorpus(_data("mult"))
  assert [e.question for e in again.eval_examples()] == [e.question for e in corpus.eval_examples()]
  # A task with few questions (one variable: 26 names x 10 values): training must skip the eval questions.
  tiny = rt.ReasoningCorpus(DataConfig(dataset="vartrack", task_size=1, task_depth=1, seq_len=16, eval_examples=100))
  test_q = {e.question for e in tiny.eval_examples()}
  train_q = {e.question for s in range(40) for e in tiny.train_examples(0, s, 8)}
  assert len(test_q) > 60 and len(train_q) > 60 and not test_q & train_q


def _decode(ids):
  return bytes(int(i) for i in ids if i < 256).decode()


@pytest.mark.parametrize("mode", rt.MODES)
def test_layout_and_loss_masks(mode):
  data = _data("vartrack", task_mode=mode, task_pause=5, task_thoughts=2, task_stage=1)
  corpus = rt.ReasoningCorpus(data)
  lay, examples = corpus.layout, corpus.train_examples(0, 0, 6)
  batch = rt.encode_rows(examples, lay, data.seq_len, corpus.stage(0))
  inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"].astype(bool)
  assert (inputs[:, lay.prefix_len - 1] == rt.BOT).all() and (batch["segment_ids"] == 1).all()
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  for row, ex in enumerate(examples):
    scored = _decode(targets[row][mask[row]])
    steps = "".join(ex.steps)
    expected = {"nocot": "", "cot": steps, "pause": "", "filler": "", "coconut": "".join(ex.steps[1:])}[mode]
    assert scored == expected + "#" + ex.answer
    assert rt.parse_answer(targets[row][mask[row]]) == ex.answer  # what generated_accuracy reads
    assert targets[row][mask[row]][-1] == rt.EOS and (targets[row][mask[row]] == rt.EOT).sum() == (mode == "cot")
  # No loss on pauses, filler or thoughts, whether as inputs or as targets.
  assert not mask[(inputs == rt.PAUSE) | (targets == rt.PAUSE) | (inputs == rt.MASK) | (targets == rt.MASK)].any()
  if mode == "pause":
    assert ((inputs == rt.PAUSE).sum(1) == 5).all()
  if mode == "filler":
    assert [(r == ord(".")).sum() for r in inputs] == [len("".join(e.steps)) for e in examples]
  if mode == "coconut":
    assert ((inputs == rt.MASK).sum(1) == 2).all()  # stage 1, c = 2


def test_coconut_stages():
  def rows(**kw):
    corpus = rt.ReasoningCorpus(_data("reach", **kw))
    return corpus, corpus.train_batch(0, 0, 8, 96)
  _, nocot = rows(task_mode="nocot")
  _, final0 = rows(task_mode="coconut", task_thoughts=0)  # the final stage with c = 0 is no-CoT
  assert all(np.array_equal(nocot[k], final0[k]) for k in nocot)
  corpus, staged = rows(task_mode="coconut", task_thoughts=2, task_stage_steps=10)
  assert [corpus.stage(s) for s in (0, 9, 10, 25, 30, 1000)] == [0, 0, 1, 2, 3, 3]
  final = corpus.eval_batches(8, 96)[0]
  assert ((final["inputs"] == rt.MASK).sum(1) == 6).all()  # eval at the final stage: max_stage * c
  assert ((staged["inputs"] == rt.MASK).sum(1) == 0).all()


def test_config_validation():
  base = Config(family="coconut", model=coconut.Config(**TINY, thoughts=6), data=_data("reach", task_mode="coconut",
                                                                                          task_thoughts=2))
  validate(base)
  with pytest.raises(ConfigError, match="thoughts=4"):
    validate(dataclasses.replace(base, model=dataclasses.replace(base.model, thoughts=4)))
  with pytest.raises(ConfigError, match="prefix_len=5"):
    validate(dataclasses.replace(base, model=dataclasses.replace(base.model, prefix_len=5)))
  with pytest.raises(ConfigError, match="seq_len=40"):
    validate(dataclasses.replace(base, data=dataclasses.replace(base.data, seq_len=40)))
  with pytest.raises(ConfigError, match="task_mode"):
    validate(dataclasses.replace(base, data=dataclasses.replace(base.data, task_mode="chain")))


# ----------------------------------------------------------------------------- coconut


def _coconut(prefix_len=0, thoughts=3, pattern="AM"):
  cfg = coconut.Config(pattern=pattern, **TINY, **IDS, thoughts=thoughts, prefix_len=prefix_len)
  return coconut.build(cfg, nnx.Rngs(0))


def test_coconut_without_thoughts_is_the_nocot_lm():
  batch = _jnp(rt.ReasoningCorpus(_data("reach", task_mode="coconut", task_thoughts=0)).train_batch(0, 0, 4, 96))
  model = _coconut(thoughts=0, pattern="A")
  got, got_m = _jit(lambda m, b: coconut.loss(m, b, None), model)(batch)
  want, want_m = _jit(lambda m, b: lm.loss(m, b, None), model)(batch)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  assert float(got_m["correct"]) == float(want_m["correct"])


def _staged_batch():
  """Reach (paths of 2 or 3 steps) with c = 1: two rows at stage 2 (2 thoughts), two at the final stage 3
  (3 thoughts), so rows differ in their number of thoughts."""
  data = _data("reach", task_mode="coconut", task_thoughts=1, task_stage=2)
  corpus = rt.ReasoningCorpus(data)
  examples = corpus.train_examples(0, 0, 4)
  a = rt.encode_rows(examples[:2], corpus.layout, 96, 2)
  b = rt.encode_rows(examples[2:], corpus.layout, 96, 3)
  batch = {k: np.concatenate([a[k], b[k]]) for k in a}
  counts = (batch["inputs"] == rt.MASK).sum(1)
  assert list(counts) == [2, 2, 3, 3]
  return corpus.layout, _jnp(batch)


def _unrolled(model, tokens, thoughts):
  """k full forward passes, each writing the last hidden state before a thought into that thought's input."""
  x = model.embed_tokens(tokens)
  b, l = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(l), (b, l))
  latent = np.asarray(tokens) == rt.MASK
  order = np.cumsum(latent, 1) - 1

  def run(model, x):
    for i in range(thoughts):
      h, _ = model.backbone(x, pos)
      rows, cols = np.nonzero(latent & (order == i))
      x = x.at[rows, cols].set(h[rows, cols - 1])
    h, _ = model.backbone(x, pos)
    return model.logits(h)

  return _jit(run, model)(x)


def test_coconut_thoughts_equal_a_hand_unrolled_loop():
  lay, batch = _staged_batch()
  model = _coconut()
  reference = _unrolled(model, batch["inputs"], 3)
  assert not np.allclose(reference, _jit(lambda m, t: m(t)[0], model)(batch["inputs"]), atol=1e-3)  # thoughts matter
  for prefix_len in (0, lay.prefix_len):  # recompute per thought; decode thoughts from the prefix cache
    got = _jit(coconut.forward, _coconut(prefix_len))(batch["inputs"], batch["segment_ids"])
    np.testing.assert_allclose(got, reference, atol=2e-5, rtol=1e-4)


def test_thought_targets_mark_the_states_that_become_thoughts():
  # Independent of encode_rows' arithmetic: find each row's <mask> runs in the inputs; with c = 2 thoughts per
  # step, the hidden state that fills the second thought of replaced step i (the position just before it)
  # carries step i's distinct tokens, and nothing else carries any.
  data = _data("reach", task_mode="coconut", task_thoughts=2, task_cot="frontier")
  corpus = rt.ReasoningCorpus(data)
  examples = corpus.train_examples(0, 0, 6)
  for stage in (1, 2, corpus.layout.max_stage):
    batch = rt.encode_rows(examples, corpus.layout, 96, stage)
    for row, ex in enumerate(examples):
      thoughts = np.flatnonzero(batch["inputs"][row] == rt.MASK)
      replaced = ex.steps[:min(stage, len(ex.steps))]
      want = {int(thoughts[2 * i + 1]) - 1: sorted(set(step.encode())) for i, step in enumerate(replaced)}
      got = {int(j): sorted(int(v) for v in t if v >= 0)
             for j, t in enumerate(batch["thought_targets"][row]) if (t >= 0).any()}
      assert got == want, (stage, ex.steps)
      assert all(set(ex.intermediates["frontier"][i]) < {chr(v) for v in want[j]}
                 for i, j in enumerate(sorted(want)))  # the frontier nodes (and ">")
  assert "thought_targets" not in rt.ReasoningCorpus(_data("reach", task_mode="cot")).train_batch(0, 0, 2, 96)


def test_thought_loss_is_the_readout_cross_entropy_at_those_states():
  lay, batch = _staged_batch()
  plain = _coconut(lay.prefix_len)
  weighted = coconut.build(dataclasses.replace(plain.cfg, thought_loss=0.5), nnx.Rngs(0))
  nnx.update(weighted, nnx.state(plain))
  base, _ = _jit(lambda m, b: coconut.loss(m, b, None), plain)(batch)
  got, metrics = _jit(lambda m, b: coconut.loss(m, b, None), weighted)(batch)
  logp = np.asarray(jax.nn.log_softmax(_jit(coconut.forward, plain)(batch["inputs"], batch["segment_ids"])))
  targets = np.asarray(batch["thought_targets"])
  per_state = [-np.mean(logp[r, j, targets[r, j][targets[r, j] >= 0]])
               for r, j in zip(*np.nonzero((targets >= 0).any(-1)))]
  examples = rt.ReasoningCorpus(_data("reach", task_mode="coconut", task_thoughts=1)).train_examples(0, 0, 4)
  assert len(per_state) == sum(min(stage, len(ex.steps)) for ex, stage in zip(examples, (2, 2, 3, 3)))
  assert float(metrics["thoughts"]) == len(per_state)
  np.testing.assert_allclose(float(metrics["thought_nats"]), np.sum(per_state), rtol=1e-5)
  np.testing.assert_allclose(float(got), float(base) + 0.5 * np.mean(per_state), rtol=1e-5)
  with pytest.raises(ValueError, match="thought_targets"):
    coconut.loss(weighted, {k: v for k, v in batch.items() if k != "thought_targets"}, None)


def test_coconut_rejects_thoughts_it_cannot_compute():
  lay, batch = _staged_batch()
  for model in (_coconut(0, thoughts=2, pattern="A"), _coconut(lay.prefix_len, thoughts=2, pattern="A")):
    assert np.isnan(float(_jit(lambda m, b: coconut.loss(m, b, None)[0], model)(batch)))


def test_coconut_generate_thinks_like_training():
  corpus = rt.ReasoningCorpus(_data("mult", task_mode="coconut", task_thoughts=1))
  model = _coconut(corpus.layout.prefix_len, thoughts=2, pattern="A")
  prompts = corpus.prompts(3)
  out = coconut.generate(model, prompts, 8, jax.random.key(0), temperature=0.0)
  p = prompts.shape[1]
  assert (out[:, p:p + 2] == rt.MASK).all() and (out[:, p + 2] == rt.EOT).all()
  logits = _jit(coconut.forward, model)(out[:, :-1], jnp.ones_like(out[:, :-1]))
  np.testing.assert_array_equal(jnp.argmax(logits[:, p + 2:], -1), out[:, p + 3:])


# ----------------------------------------------------------------------------- recurrent depth


def _recurrent(pattern="AAA", **kw):
  cfg = recurrent.Config(pattern=pattern, **TINY, backprop_iters=2, **kw)
  return recurrent.build(cfg, nnx.Rngs(0))


def test_recurrent_once_without_injection_is_the_plain_stack():
  model = _recurrent()
  stack = lm.build(lm.Config(pattern="AAA", **TINY), nnx.Rngs(0))  # the same initial weights
  tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, 256)
  x = model.embed_tokens(tokens)
  s0 = jax.random.normal(jax.random.key(1), x.shape)
  want, _ = _jit(lambda m, t: m(t), stack)(tokens)
  once = _compiled(lambda m, x, s0: recurrent.forward_embeddings(m, x, jnp.int32(1), s0))
  assert not np.allclose(once(model, x, s0), want, atol=1e-3)
  d = TINY["d_model"]
  model.adapter.kernel[...] = jnp.concatenate([jnp.zeros((d, d)), jnp.eye(d)])  # injection passes e through
  np.testing.assert_allclose(once(model, x, s0), want, atol=1e-5)
  logp, count = _jit(lambda m, x, s0: recurrent.run_test(m, x, 1, s0), model)(x, s0)
  np.testing.assert_allclose(logp, jax.nn.log_softmax(want), atol=1e-5)
  assert (count == 1).all()


def test_recurrent_truncated_backprop():
  model = _recurrent()
  tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, 256)
  x = model.embed_tokens(tokens)
  s0 = jax.random.normal(jax.random.key(1), x.shape)
  pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
  graphdef, state = nnx.split(model)
  grads = jax.jit(jax.grad(lambda state, s, r: recurrent.forward_embeddings(nnx.merge(graphdef, state), x, r, s).sum(),
                           argnums=(0, 1)))
  assert float(jnp.abs(grads(state, s0, jnp.int32(2))[1]).min()) > 0  # r <= k: the first iteration is in the window
  assert float(jnp.abs(grads(state, s0, jnp.int32(5))[1]).max()) == 0.0  # before the window: no gradient
  got, grad_s0 = grads(state, s0, jnp.int32(3))
  assert float(jnp.abs(grad_s0).max()) == 0.0

  def unrolled(m, r, k=2):
    """r core iterations by hand, the first r - k with constant weights, input and state."""
    e = m.prelude(x, pos, None)
    graphdef, state = nnx.split(m)
    constant = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    s = s0
    for i in range(r):
      s = constant.core(s, jax.lax.stop_gradient(e), pos, None) if i < r - k else m.core(s, e, pos, None)
      s = jax.lax.stop_gradient(s) if i < r - k else s
    return m.coda(s, pos, None).sum()

  want = _grads(lambda m: unrolled(m, 3), model)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()) + 1e-7, rtol=1e-3)


def test_recurrent_iterations_and_adaptive_exit():
  model = _recurrent(mean_iters=3.0, max_iters=9)
  r = jax.vmap(lambda k: recurrent.sample_iters(model.cfg, k))(jax.random.split(jax.random.key(0), 2000))
  assert int(r.min()) >= 1 and int(r.max()) <= 9 and 3.3 < float(r.mean()) < 4.3  # E[r] = mean_iters + 1, capped
  x = model.embed_tokens(jax.random.randint(jax.random.key(0), (2, 9), 0, 256))
  s0 = jnp.zeros_like(x)
  run = _jit(lambda m, x, s0, kl: recurrent.run_test(m, x, 7, s0, exit_kl=kl)[1], model)
  assert (run(x, s0, 1e9) == 1).all()  # any KL is small enough: exit after one iteration
  assert (run(x, s0, 1e-30) == 7).all()


# ----------------------------------------------------------------------------- causality, every variant


@pytest.mark.parametrize("variant", ["coconut-recompute", "coconut-cached", "recurrent"])
def test_causal_through_gradients(variant):
  lay, batch = _staged_batch()
  tokens = batch["inputs"][:1]
  latent = tokens == rt.MASK
  if variant == "recurrent":
    model = _recurrent()
    s0 = jax.random.normal(jax.random.key(1), tokens.shape + (TINY["d_model"],))
    fn = lambda m, x: recurrent.forward_embeddings(m, x, jnp.int32(3), s0)
  else:
    model = _coconut(0 if variant == "coconut-recompute" else lay.prefix_len, pattern="A")
    fn = lambda m, x: coconut.forward_embeddings(m, x, latent)
  x = model.embed_tokens(tokens)
  last_thought = int(np.flatnonzero(np.asarray(latent[0]))[-1])
  grad = _jit(lambda m, x, t: jax.grad(lambda x: jnp.take(fn(m, x)[0], t, axis=0).sum())(x), model)
  for t in (lay.prefix_len - 5, last_thought - 1, last_thought + 3):
    g = jnp.abs(grad(x, t))[0].max(-1)
    assert float(g[t + 1:].max()) == 0.0, (variant, t)
    seen = np.asarray(g[:t + 1])[~np.asarray(latent[0, :t + 1])]  # a thought's token embedding is replaced
    assert seen.min() > 0.0, (variant, t)


# ----------------------------------------------------------------------------- through the loop


@pytest.mark.parametrize("family", ["coconut", "coconut-readout", "recurrent"])
def test_loss_falls_through_the_loop(tmp_path, family):
  from altbench.train import loop, metrics
  data = _data("mult", task_mode="nocot" if family == "recurrent" else "coconut", task_thoughts=1,
               task_stage_steps=10, eval_examples=8)
  if family.startswith("coconut"):
    model = coconut.Config(pattern="AA", **{**TINY, "vocab_size": 0}, thoughts=2,
                           prefix_len=rt.layout(data).prefix_len, thought_loss=float(family == "coconut-readout"))
    family = "coconut"
  else:
    model = recurrent.Config(pattern="AA", **{**TINY, "vocab_size": 0}, prelude=0, mean_iters=2.0, max_iters=4,
                             backprop_iters=1)
  cfg = Config(family=family, model=model, data=data,
               train=TrainConfig(steps=20, batch_size=16, lr=1e-2, warmup_steps=3, log_every=1, eval_every=0,
                                 ckpt_every=0, samples=0))
  result = loop.train(cfg, str(tmp_path), log=lambda *a, **k: None)
  losses = [l["loss"] for l in metrics.read_jsonl(tmp_path / "metrics.jsonl") if "loss" in l]
  readout = getattr(model, "thought_loss", 0) > 0  # its loss adds the thoughts' readout as stages replace steps
  assert np.mean(losses[-5:]) < np.mean(losses[:3]) - (0.3 if readout else 1.0), losses
  assert np.isfinite(result["eval_loss"])
  assert np.isfinite(result.get("eval_thought_nll", 0.0)) and ("eval_thought_nll" in result) == readout


@pytest.mark.parametrize("scale", ["cpu", "smoke"])
def test_experiment_variants_match_params_and_training_flops(scale):
  # experiments/reasoning.py compares architectures at the CoT baseline's parameters and training FLOPs:
  # every variant of a task must land within 4% of its parameters (recurrent depth matches them by its MLP
  # width in steps of 32, ~10% of the 64-wide smoke model per step) and within one of its steps of its budget.
  import os

  from altbench import archs
  from conftest import ROOT
  from altbench.train.config import load_module
  reasoning = load_module(os.path.join(ROOT, "experiments", "reasoning.py"))
  for task in reasoning.TASKS:
    def params_and_flops(arch):
      cfg = reasoning.get_config(f"{task}-{arch}-{scale}")
      model = dataclasses.replace(cfg.model, vocab_size=262)
      if cfg.family == "coconut":
        model = dataclasses.replace(model, **IDS)
      family = archs.get_family(cfg.family)
      per_step = family.flops_per_token(model, cfg.data.seq_len) * cfg.data.seq_len * cfg.train.batch_size
      return archs.param_count(cfg.family, model), per_step, cfg.train.steps
    params0, per_step0, steps0 = params_and_flops("cot")
    for arch in reasoning.ARCHS:
      params, per_step, steps = params_and_flops(arch)
      assert abs(params / params0 - 1) < 0.04, (task, arch, params, params0)
      assert abs(steps * per_step - steps0 * per_step0) <= per_step, (task, arch, steps, per_step)


def test_lookup_rate_reads_the_predictions_at_the_cot_letters(monkeypatch):
  # A stand-in model that predicts every gold token scores exact = in_frontier = 1 at every step; one that
  # predicts each gold letter in upper case scores 0: the rate reads the right positions.
  import os

  from conftest import ROOT
  from altbench.train.config import load_module
  reasoning = load_module(os.path.join(ROOT, "experiments", "reasoning.py"))
  corpus = rt.ReasoningCorpus(_data("reach", task_cot="frontier", eval_examples=24))
  targets = rt.encode_rows(corpus.eval_examples(), corpus.layout, corpus.cfg.seq_len, 0)["targets"]
  for shift, want in ((0, 1.0), (-32, 0.0)):
    monkeypatch.setattr(coconut, "forward", lambda model, inputs, s=shift: jax.nn.one_hot(targets + s, 262))
    rates = reasoning.lookup_rate(None, corpus)
    assert set(rates) == {1, 2, 3}
    for r in rates.values():
      assert r["exact"] == r["in_frontier"] == want and 0 < r["random_node"] < 1


def test_reach_answers_are_read_against_guessing():
  import numpy as np
  from altbench.train import leaderboard
  from altbench.train import reasoning_tasks as rt
  examples = [rt.reach(np.random.default_rng(i), size=10, depth=2) for i in range(4)]
  cands = [rt.answer_candidates(ex) for ex in examples]
  assert all(len(c) == 2 and ex.answer in c for c, ex in zip(cands, examples))
  wrong = [next(x for x in c if x != ex.answer) for c, ex in zip(cands, examples)]
  assert rt.answer_summary(examples, wrong) == {"valid": 1.0, "chance": 0.5}
  assert rt.answer_summary(examples, [None, "#", "zz", wrong[3]])["valid"] == 0.25
  assert rt.answer_summary([rt.mult(np.random.default_rng(0))], ["12"]) == {"valid": 1.0, "chance": None}
  row = dict(gen_acc=0.0625, gen_examples=32, chance_acc=0.5, gen_valid=0.0)
  assert leaderboard.greedy_cell(row) == "0.062 (no valid answers)"
  assert leaderboard.greedy_cell({**row, "gen_valid": 1.0, "gen_acc": 0.5625}) == "0.562 (at chance)"
  assert leaderboard.greedy_cell({**row, "gen_valid": 1.0, "gen_acc": 0.9}) == "0.900"
