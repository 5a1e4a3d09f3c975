"""Ye et al.'s minimal planning task (train/reasoning_tasks.py `plan`), its checker, the diffusion "topk" sampler
and the calibration experiment's configs and statistics."""

import collections
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altbench.archs import diffusion
from altbench.train import config, reasoning_tasks as rt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _examples(n=300, size=7, depth=2):
  return [rt.plan(np.random.default_rng([5, i]), size, depth) for i in range(n)]


def test_two_chains_share_exactly_one_node():
  for ex in _examples():
    edges, start, goal = rt.plan_parse(ex.question)
    assert len(edges) == 12 and len(set(edges)) == 12
    nodes = {v for e in edges for v in e}
    assert len(nodes) == 13  # 2 x 7 nodes, one shared
    a, b = ex.intermediates["chains"]
    assert len(set(a)) == len(set(b)) == 7
    assert set(a) & set(b) == {a[ex.intermediates["shared_index"]]}
    assert a.index(next(iter(set(a) & set(b)))) == b.index(next(iter(set(a) & set(b))))  # the same index
    assert set(edges) == set(zip(a, a[1:])) | set(zip(b, b[1:]))
    assert (start, goal) == (a[0], a[-1])
    assert rt.check_plan(ex) == []


def test_answer_is_a_path_from_start_to_goal_along_given_edges():
  for ex in _examples():
    edges, start, goal = rt.plan_parse(ex.question)
    nodes = rt.plan_path(ex.answer)
    assert nodes[0] == start and nodes[-1] == goal and len(nodes) == 7
    assert all(e in set(edges) for e in zip(nodes, nodes[1:]))
    assert rt.plan_correct(ex.question, ex.answer)
    k = ex.intermediates["shared_index"]
    out = collections.Counter(a for a, _ in edges)
    branches = [v for v in nodes[:-1] if out[v] == 2]  # the scorer's key: the first gold edge out of a degree-2 node
    assert branches == ([nodes[k]] if k < 6 else [])
    assert ex.intermediates["planning_distance"] == 6 - k


def test_edges_are_shuffled_and_the_shared_index_is_uniform():
  exs = _examples(700)
  firsts = collections.Counter()
  for ex in exs:
    edges, _, _ = rt.plan_parse(ex.question)
    firsts[edges.index(tuple(rt.plan_path(ex.answer)[:2]))] += 1  # where the path's first edge lands
  assert len(firsts) == 12 and max(firsts.values()) < 0.2 * len(exs)
  ks = collections.Counter(ex.intermediates["shared_index"] for ex in exs)
  assert sorted(ks) == list(range(7)) and min(ks.values()) > 0.5 * len(exs) / 7


def test_checker_rejects_wrong_paths():
  ex = next(e for e in _examples() if 0 < e.intermediates["shared_index"] < 5)
  edges, start, goal = rt.plan_parse(ex.question)
  nodes = rt.plan_path(ex.answer)
  k = ex.intermediates["shared_index"]
  other = next(b for a, b in edges if a == nodes[k] and b != nodes[k + 1])  # the wrong branch
  wrong = [e for e in zip(nodes[:k + 1], nodes[1:k + 1])] + [(nodes[k], other)]
  cur = other
  while any(a == cur for a, _ in edges):
    nxt = next(b for a, b in edges if a == cur)
    wrong.append((cur, nxt))
    cur = nxt
  fmt = lambda es: "/".join(f"{a},{b}" for a, b in es)
  assert not rt.plan_correct(ex.question, fmt(wrong))  # follows real edges, ends at the other chain's end
  assert not rt.plan_correct(ex.question, fmt(list(zip(nodes, nodes[1:]))[:-1]))  # stops short of the goal
  bad = list(zip(nodes, nodes[1:]))
  bad[2] = (bad[2][0], goal)  # a shortcut edge the question does not have
  assert not rt.plan_correct(ex.question, fmt(bad[:3]))
  assert not rt.plan_correct(ex.question, ex.answer.replace("/", ";"))
  assert not rt.plan_correct(ex.question, "")
  assert not rt.plan_correct(ex.question, fmt([(b, a) for a, b in zip(nodes, nodes[1:])]))  # edges flipped in place
  backwards = fmt([(b, a) for a, b in zip(nodes, nodes[1:])][::-1])  # cal_path_acc's reverse_check accepts this
  assert rt.plan_correct(ex.question, backwards)
  assert rt.check_plan(dataclasses.replace(ex, answer=fmt(wrong)))


def test_batches_are_a_function_of_seed_and_step():
  data = config.DataConfig(dataset="plan", task_mode="nocot", task_size=7, task_depth=2, seq_len=78, eval_examples=16)
  corpus = rt.ReasoningCorpus(data)
  a, b = corpus.train_batch(3, 10, 8, 78), corpus.train_batch(3, 10, 8, 78)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["targets"], corpus.train_batch(3, 11, 8, 78)["targets"])
  assert not np.array_equal(a["targets"], corpus.train_batch(4, 10, 8, 78)["targets"])
  # no padding: 51 question bytes, then <bot><eot>#, 23 answer bytes, <eos>; loss on "#answer<eos>" only
  assert (a["loss_mask"].sum(1) == 25).all() and (a["targets"] != rt.PAD).all()
  eval_q = {ex.question for ex in corpus.eval_examples()}
  assert not eval_q & {ex.question for ex in corpus.train_examples(3, 10, 64)}


def test_layout_rejects_impossible_sizes():
  with pytest.raises(ValueError, match="plan needs"):
    rt.layout(config.DataConfig(dataset="plan", task_mode="nocot", task_size=14, task_depth=2, seq_len=200))


def _tiny_diffusion():
  cfg = diffusion.Config(pattern="A", d_model=32, n_heads=2, vocab_size=rt.PAUSE + 1, mask_id=rt.MASK,
                         eos_id=rt.PAUSE)
  return diffusion.build(cfg, nnx.Rngs(0))


@pytest.mark.parametrize("noise", [0.0, 50.0])
def test_topk_sampler_fills_every_position_and_keeps_the_prompt(noise):
  model = _tiny_diffusion()
  rng = np.random.default_rng(0)
  canvas = rng.integers(0, 256, size=(3, 20)).astype(np.int32)
  fixed = np.zeros((3, 20), bool)
  fixed[:, :8] = True
  fixed[1, 15] = True
  out, calls = diffusion.infill(model, canvas, fixed, jax.random.key(1), temperature=0.0, steps=5, sampler="topk",
                                remask_noise=noise)
  out = np.asarray(out)
  assert not (out == rt.MASK).any()
  assert np.array_equal(out[fixed], canvas[fixed])
  assert calls <= 5


def test_diffusion_masks_only_the_answer_of_plan_rows():
  data = config.DataConfig(dataset="plan", task_mode="nocot", task_size=7, task_depth=2, seq_len=78, eval_examples=4)
  batch = rt.ReasoningCorpus(data).train_batch(0, 0, 4, 78)
  model = _tiny_diffusion()
  x, valid = jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"], jnp.float32)
  _, _, z = diffusion.nelbo_terms(model, model.cfg, x, valid, jnp.full((4, 1), 0.999), jnp.zeros((4, 78)))
  z = np.asarray(z)
  assert (z[np.asarray(valid) == 0] == np.asarray(x)[np.asarray(valid) == 0]).all()
  assert (z[np.asarray(valid) == 1] == rt.MASK).all()


def test_experiment_configs_and_statistics():
  exp = config.load_module(os.path.join(ROOT, "experiments", "calibration", "planning.py"))
  for v in exp.VARIANTS:
    config.validate(exp.get_config(v))
  gpu = exp.get_config("mdm-gpu")
  assert (gpu.model.d_model, gpu.model.n_heads, len(gpu.model.pattern), gpu.train.batch_size) == (384, 12, 3, 1024)
  assert exp.get_config("ar-gpu").train.steps == 2 * gpu.train.steps  # 200 vs 100 epochs
  mean, (lo, hi) = exp.t_interval([0.5, 0.6, 0.7])
  assert mean == pytest.approx(0.6) and hi - mean == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
  exs = _examples(40)
  acc, by_pd, n_pd = exp.score(exs, [ex.answer for ex in exs[:20]] + [None] * 20)
  assert acc == 0.5 and sum(n_pd.values()) == 40 and set(by_pd) <= set(range(7))
  rows = [{"family": f, "seed": s, "params": 1, "train_flops": 1.0, "n_by_pd": {str(k): 10 for k in range(7)},
           "acc_by_pd": {str(k): (1.0 if f == "mdm" or k < 2 else 0.5 + 0.01 * s) for k in range(7)}}
          for f in ("ar", "mdm") for s in range(3)]
  claims = exp.claims(rows, "cpu")
  keys = {"paper", "source", "setting", "published", "ours", "seeds", "params", "train_flops", "reduced", "verdict"}
  assert claims and all(set(c) == keys and c["seeds"] == 3 for c in claims)
  assert [c["verdict"] for c in claims] == ["trend reproduced at reduced scale"] * 3
