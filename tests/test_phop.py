"""p-hop induction (train/tasks.py `phop`, `phop-all`) against a brute-force reading of its definition, and recurrent
depth's fixed_iters (a block looped exactly r times in training: experiments/calibration/looped.py's looped model)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altbench.archs import recurrent
from altbench.train import config, tasks
from altbench.train.config import DataConfig

LETTERS = tuple(int(c) for c in tasks.PHOP_LETTERS)


def brute_hop(x, p):
  """p hops from the last position, each to the token right after the latest earlier occurrence of the current
  token, by a plain backwards search (None when there is none)."""
  pos = len(x) - 1
  for _ in range(p):
    earlier = [j for j in range(pos) if x[j] == x[pos]]
    if not earlier:
      return None
    pos = earlier[-1] + 1
  return x[pos]


def test_answer_is_the_brute_force_p_hop():
  for p in (1, 2, 3, 5, 8):
    for i in range(40):
      tokens, answer = tasks.phop_example(np.random.default_rng([p, i]), 49, p)
      letters = list(tokens[:-1])
      assert len(tokens) == 49 and set(letters) <= set(LETTERS)
      assert tokens[-1] == brute_hop(letters, p)
      assert answer[-1] and answer.sum() == 1  # loss only on the answer
      assert all(a != b for a, b in zip(letters, letters[1:]))  # no letter repeats its predecessor
      path = tasks.hop_positions(np.asarray(letters), p)
      assert all(b < a for a, b in zip(path, path[1:]))  # every hop moves back: exactly p hops, none stays put


def test_one_hop_is_the_induction_head_answer():
  for i in range(40):
    tokens, _ = tasks.phop_example(np.random.default_rng(i), 33, 1)
    x = tokens[:-1]
    j = np.flatnonzero(x[:-1] == x[-1])[-1]  # the previous occurrence of the last token
    assert tokens[-1] == x[j + 1]


def test_answers_need_every_hop():
  """The p-hop answer is not the (p-1)-hop one on a good share of examples (the task is not solved by fewer hops)."""
  rng = np.random.default_rng(0)
  same = [brute_hop(list(t[:-1]), 3) == brute_hop(list(t[:-1]), 4)
          for t, _ in (tasks.phop_example(rng, 65, 4) for _ in range(200))]
  assert np.mean(same) < 0.5


def test_batches_are_deterministic_per_seed_and_step():
  cfg = DataConfig(dataset="phop", task_hops=3, seq_len=32, eval_examples=10)
  config.validate(config.Config(data=cfg))
  a, b = tasks.TaskCorpus(cfg), tasks.TaskCorpus(cfg)
  x, y = a.train_batch(1, 5, 4, 32), b.train_batch(1, 5, 4, 32)
  for k in x:
    np.testing.assert_array_equal(x[k], y[k])
  assert x["inputs"].shape == (4, 32) and (x["loss_mask"][:, -1] == 1).all() and x["loss_mask"][:, :-1].sum() == 0
  assert not np.array_equal(x["inputs"], a.train_batch(1, 6, 4, 32)["inputs"])
  assert not np.array_equal(x["inputs"], a.train_batch(2, 5, 4, 32)["inputs"])
  for u, v in zip(a.eval_batches(4, 32), b.eval_batches(4, 32)):
    np.testing.assert_array_equal(u["inputs"], v["inputs"])
  assert sum(int(e["loss_mask"].sum()) for e in a.eval_batches(4, 32)) == 10
  assert a.prompts(2).shape == (2, 32)


def test_config_checks_hops():
  bad = config.Config(data=DataConfig(dataset="phop", task_hops=0))
  try:
    config.validate(bad)
  except config.ConfigError as e:
    assert "task_hops" in str(e)
  else:
    raise AssertionError("task_hops=0 passed")


# ----------------------------------------------------------------------------- recurrent depth at a fixed r

TINY = dict(d_model=32, n_heads=2, vocab_size=262)


def test_fixed_iters_trains_exactly_r_iterations():
  cfg = recurrent.Config(pattern="A", prelude=0, coda=0, mean_iters=3, max_iters=3, backprop_iters=3, state_std=0.0,
                         fixed_iters=True, **TINY)
  model = recurrent.build(cfg, nnx.Rngs(0))
  r = jax.vmap(lambda k: recurrent.sample_iters(cfg, k))(jax.random.split(jax.random.key(0), 50))
  assert (r == 3).all() and cfg.iters_at_test == 3 and recurrent._expected_free_iters(cfg) == 0.0
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 256)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "segment_ids": jnp.ones_like(tokens),
           "loss_mask": jnp.ones_like(tokens), "nbytes": jnp.ones_like(tokens)}
  graphdef, state = nnx.split(model)
  train = jax.jit(jax.value_and_grad(lambda s, rng: recurrent.loss(nnx.merge(graphdef, s), batch, rng), has_aux=True))
  (value, metrics), grads = train(state, jax.random.key(2))
  assert float(metrics["iters"]) == 3 * float(metrics["tokens"])

  def by_hand(state, iters):
    """The block looped `iters` times from the zero state, every iteration in the gradient."""
    m = nnx.merge(graphdef, state)
    x = m.embed_tokens(tokens)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    s = jnp.zeros_like(x)
    for _ in range(iters):
      s = m.core(s, x, pos, None)
    return recurrent._metrics(m.coda(s, pos, None), batch)[0]

  want, want_grads = jax.jit(jax.value_and_grad(by_hand), static_argnums=1)(state, 3)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert abs(float(value) - float(jax.jit(by_hand, static_argnums=1)(state, 2))) > 1e-6  # r matters
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-8, rtol=1e-3)
  eval_value, _ = recurrent.eval_loss(model, batch, jax.random.key(3))  # test time: the same r
  np.testing.assert_allclose(eval_value, want, rtol=1e-5)


def test_fixed_iters_needs_an_integer_r():
  for kw in (dict(mean_iters=2.5, max_iters=4), dict(mean_iters=5, max_iters=4)):
    try:
      recurrent.Config(pattern="A", prelude=0, coda=0, fixed_iters=True, **kw, **TINY).validate()
    except ValueError as e:
      assert "fixed_iters" in str(e)
    else:
      raise AssertionError(f"{kw} passed")
  dataclasses.replace(recurrent.Config(pattern="A", prelude=0, coda=0, **TINY), fixed_iters=True, mean_iters=4.0,
                      max_iters=4).validate()


def test_phop_all_targets_every_position_and_scores_the_last():
  for i in range(20):
    letters, targets, mask = tasks.phop_all_example(np.random.default_rng(i), 40, 3)
    want, _ = tasks.phop_example(np.random.default_rng(i), 41, 3)
    np.testing.assert_array_equal(letters, want[:-1])  # phop's rows
    assert mask[-1] and targets[-1] == want[-1]
    for j in range(40):
      b = brute_hop(list(letters[:j + 1]), 3)
      assert (b is None) == (not mask[j]) and (b is None or targets[j] == b)
  cfg = DataConfig(dataset="phop-all", task_hops=3, seq_len=32, eval_examples=6)
  corpus = tasks.TaskCorpus(cfg)
  assert corpus.train_batch(0, 0, 4, 32)["loss_mask"].sum() > 4 * 10  # most positions carry loss
  evals = corpus.eval_batches(4, 32)
  assert sum(int(e["loss_mask"].sum()) for e in evals) == 6 and all(e["loss_mask"][:, :-1].sum() == 0 for e in evals)
  phop = tasks.TaskCorpus(dataclasses.replace(cfg, dataset="phop")).eval_batches(4, 32)
  for a, b in zip(evals, phop):  # the same eval rows and answers as phop
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"][:, -1], b["targets"][:, -1])
