"""Generated tasks: answers checked independently, determinism, eval apart from train, accuracy metric."""

import numpy as np

from altbench.train import tasks
from altbench.train.config import DataConfig


def _corpus(pairs=8, seq_len=48):
  return tasks.TaskCorpus(DataConfig(dataset="mqar", task_pairs=pairs, seq_len=seq_len, eval_examples=10))


def test_mqar_answers_are_the_values_of_their_keys():
  corpus = _corpus()
  batch = corpus.train_batch(0, 3, 6, 48)
  for inputs, targets, mask in zip(batch["inputs"], batch["targets"], batch["loss_mask"]):
    table = dict(zip(inputs[1:17:2], inputs[2:17:2]))  # the 8 pairs after <eos>
    assert len(table) == 8 and all(k < 128 <= v < 256 for k, v in table.items())
    answered = np.flatnonzero(mask)
    assert len(answered) == 8  # (48 - 1 - 16) // 2 = 15 >= 8: every key is queried once
    assert sorted(inputs[answered]) == sorted(table)
    for t in answered:
      assert targets[t] == table[inputs[t]]


def test_batches_are_deterministic_and_eval_is_apart():
  corpus = _corpus()
  a, b = corpus.train_batch(1, 5, 4, 48), corpus.train_batch(1, 5, 4, 48)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["inputs"], corpus.train_batch(1, 6, 4, 48)["inputs"])
  evals = corpus.eval_batches(4, 48)
  assert sum(int(e["loss_mask"].any(axis=1).sum()) for e in evals) == 10  # padded rows carry no loss
  train_rows = {tuple(r) for s in range(50) for r in corpus.train_batch(0, s, 4, 48)["inputs"]}
  assert not train_rows & {tuple(r) for e in evals for r in e["inputs"]}


def test_eval_accuracy_metric_counts_exact_answers():
  import jax.numpy as jnp
  from flax import nnx
  from altbench.archs import lm
  corpus = _corpus()
  batch = {k: jnp.asarray(v) for k, v in corpus.eval_batches(4, 48)[0].items()}
  model = lm.build(lm.Config(vocab_size=262, d_model=32, n_heads=2, pattern="A"), nnx.Rngs(0))
  _, m = lm.loss(model, batch, None)
  logits, _ = model(batch["inputs"], segment_ids_BL=batch["segment_ids"])
  expected = ((jnp.argmax(logits, -1) == batch["targets"]) * batch["loss_mask"]).sum()
  assert float(m["correct"]) == float(expected) and float(m["tokens"]) == float(batch["loss_mask"].sum())
