"""mqar-zoology (train/tasks.py) against Zoology's layout, and experiments/mqar.py's configs and report."""

import os

import numpy as np
import pytest

from altbench.train import tasks
from altbench.train.config import DataConfig, load_module, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus(pairs=8, seq_len=128, vocab=0):
  return tasks.TaskCorpus(DataConfig(dataset="mqar-zoology", task_pairs=pairs, seq_len=seq_len, task_size=vocab,
                                     eval_examples=10))


def test_layout_is_zoologys():
  vocab, pairs, seq_len = 8192, 8, 128
  batch = _corpus(pairs, seq_len).train_batch(0, 0, 16, seq_len)
  for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
    keys, values = inputs[0:2 * pairs:2], inputs[1:2 * pairs:2]
    assert len(set(keys)) == pairs and len(set(values)) == pairs
    assert all(1 <= k < vocab // 2 for k in keys) and all(vocab // 2 <= v < vocab for v in values)
    table = dict(zip(keys, values))
    asked = np.flatnonzero(mask)
    assert len(asked) == pairs  # every key queried once
    assert all(t >= 2 * pairs and (t - 2 * pairs) % 2 == 0 for t in asked)  # at even slots after the pairs
    assert sorted(inputs[asked]) == sorted(keys)
    assert all(targets[t] == table[inputs[t]] for t in asked)  # the answer: the value paired with that key
    rest = np.ones(seq_len, bool)
    rest[:2 * pairs] = False
    rest[asked] = False
    assert not inputs[rest].any() and not targets[~mask.astype(bool)].any()  # filler 0; no loss elsewhere
    assert not set(inputs[2 * pairs:]) & set(values)  # answers never enter the input


def test_query_gaps_follow_a_power_law():
  pairs, seq_len = 16, 256
  rng = np.random.default_rng(0)
  slots = (seq_len - 2 * pairs) // 2
  gaps = np.concatenate([np.flatnonzero(tasks.mqar_zoology_example(rng, seq_len, pairs)[2])
                         for _ in range(200)]) - 2 * pairs
  uniform_mean = np.mean([np.sort(rng.choice(slots, pairs, replace=False)) for _ in range(200)]) * 2
  assert gaps.mean() < 0.8 * uniform_mean  # short gaps favoured (power_a = 0.01)


def test_deterministic_per_seed_and_step_and_eval_apart():
  corpus = _corpus(4, 64)
  a, b = corpus.train_batch(3, 7, 4, 64), corpus.train_batch(3, 7, 4, 64)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["inputs"], corpus.train_batch(3, 8, 4, 64)["inputs"])
  assert not np.array_equal(a["inputs"], corpus.train_batch(4, 7, 4, 64)["inputs"])
  evals = corpus.eval_batches(4, 64)
  assert sum(int(e["loss_mask"].any(axis=1).sum()) for e in evals) == 10
  train_rows = {tuple(r) for s in range(20) for r in corpus.train_batch(0, s, 4, 64)["inputs"]}
  assert not train_rows & {tuple(r) for e in evals for r in e["inputs"]}


def test_vocabulary_reaches_the_model(tmp_path):
  from altbench.archs import lm
  from altbench.train import loop
  from altbench.train.config import Config, TrainConfig
  assert _corpus().tokenizer.vocab_size == 8192 and _corpus(vocab=512).tokenizer.vocab_size == 512
  cfg = Config(family="lm", model=lm.Config(pattern="A", d_model=16, n_heads=1, vocab_size=0),
               data=DataConfig(dataset="mqar-zoology", task_pairs=4, seq_len=64), train=TrainConfig(steps=1))
  resolved, _ = loop.resolve(cfg, str(tmp_path / "run"))
  assert resolved.model.vocab_size == 8192
  with pytest.raises(ValueError, match="task_size"):
    _corpus(pairs=4, seq_len=64, vocab=64)  # Zoology asserts vocab > seq_len
  with pytest.raises(ValueError, match="seq_len"):
    _corpus(pairs=20, seq_len=64)


def test_experiment_configs_and_report(tmp_path):
  mqar = load_module(os.path.join(ROOT, "experiments", "mqar.py"))
  full = mqar.get_config("attention-d64-s256")
  assert (full.data.task_size, full.train.batch_size, full.train.steps, full.data.eval_examples) == (
      8192, 256, 64 * (100_000 // 256), 3000)
  assert full.model.pattern == "AA" and not full.model.mlp and full.model.n_heads == 1
  assert mqar.get_config("mamba2-n16-d128-s64-cpu").model.d_state == 16
  for variant, _, _ in mqar.grid("cpu")[:5] + mqar.grid("full")[:5]:  # every architecture, both budgets
    validate(mqar.get_config(variant))
  rows = [dict(arch=a, pattern=mqar.ARCHS[a][0], d_model=d, seq_len=64, lr=lr, seed=0, eval_acc=acc, vocab=512,
               batch=32, steps=10, steps_run=10, best_step=10, eval_every=5, eval_examples=8, early_stopped=False,
               wall_s=1.0, params=1000, machine="test", variant=f"{a}-d{d}-s64{suffix}")
          for a, d, lr, acc, suffix in [("attention", 64, 1e-2, 0.5, "-cpu"), ("attention", 64, 1e-3, 0.9, "-cpu"),
                                        ("gdn", 64, 1e-2, 0.2, "-cpu"), ("attention", 64, 1e-2, 0.99, "-cpu3x")]]
  text = mqar.table(rows, "cpu")
  assert "| attention `AA` | ours | 0.900 |" in text  # the best over learning rates, at the grid's budget only
  assert "| attention | Zoology fig. 2 | ~0.97 |" in text and "vocabulary 512 (protocol 8192)" in text
  assert "## Longer budgets" in text and "| 0.9900 |" in text
  mqar.figure(rows, str(tmp_path / "fig.png"))
