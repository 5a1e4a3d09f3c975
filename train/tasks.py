"""Generated tasks as datasets: no download, examples a pure function of (seed, step), accuracy as a metric.

`mqar`: multi-query associative recall as in the Zoology benchmark (Arora et al., 2023): key-value pairs,
then the keys again in random order; the model must answer each key with its value. Keys are byte ids
0..127 and values 128..255, so the byte tokenizer serves every family. Only answers carry loss; the
loop reports `eval_acc`, the fraction of answers predicted exactly (argmax).
"""

import numpy as np

from altbench.train import reasoning_tasks
from altbench.train.data import ByteTokenizer

EVAL_SEED = 1 << 30  # eval examples come from their own seed stream, apart from any training seed


def mqar_example(rng, seq_len, pairs):
  """(tokens (n,), answer_mask (n,)): answer_mask[i] marks tokens[i] as an answer to predict."""
  keys = rng.choice(128, size=pairs, replace=False)
  values = 128 + rng.integers(0, 128, size=pairs)
  queries = rng.permutation(pairs)[: max(0, (seq_len - 1 - 2 * pairs) // 2)]
  tokens = np.concatenate([[256], np.stack([keys, values], 1).ravel(), np.stack([keys[queries], values[queries]], 1).ravel()])
  answer = np.zeros(len(tokens), bool)
  answer[2 * pairs + 2::2] = True  # each queried value, right after its key
  return tokens.astype(np.int32), answer


TASKS = {"mqar": mqar_example, **reasoning_tasks.TASKS}  # reach, mult, vartrack: see train/reasoning_tasks.py


class TaskCorpus:
  """Batches of generated examples, padded to seq_len + 1 tokens; loss only on the answers."""

  def __new__(cls, data_cfg):
    if data_cfg.dataset in reasoning_tasks.TASKS:  # reasoning tasks have their own corpus (same interface)
      return reasoning_tasks.ReasoningCorpus(data_cfg)
    return super().__new__(cls)

  def __init__(self, data_cfg):
    self.cfg = data_cfg
    self.tokenizer = ByteTokenizer()
    if data_cfg.seq_len < 4 * data_cfg.task_pairs:
      raise ValueError(f"data.seq_len={data_cfg.seq_len}: mqar with data.task_pairs={data_cfg.task_pairs} "
                       f"needs at least {4 * data_cfg.task_pairs} (pairs, then as many queries)")
    self.make = TASKS[data_cfg.dataset]
    self.eval_bytes = 0
    self.stats = {"task": data_cfg.dataset, "pairs": data_cfg.task_pairs, "eval_examples": data_cfg.eval_examples,
                  "train_tokens": "generated", "vocab_size": self.tokenizer.vocab_size}

  def _batch(self, rngs, seq_len):
    pad = self.tokenizer.special["<pad>"]
    windows = np.full((len(rngs), seq_len + 1), pad, np.int32)
    answers = np.zeros((len(rngs), seq_len + 1), bool)
    for row, rng in enumerate(rngs):
      tokens, answer = self.make(rng, seq_len + 1, self.cfg.task_pairs)
      windows[row, :len(tokens)], answers[row, :len(tokens)] = tokens, answer
    inputs, targets, loss_mask = windows[:, :-1], windows[:, 1:], answers[:, 1:].astype(np.int32)
    return {"inputs": inputs, "targets": targets, "segment_ids": (inputs != pad).astype(np.int32),
            "loss_mask": loss_mask, "nbytes": loss_mask}

  def train_batch(self, seed, step, batch_size, seq_len, rows=None):  # rows: generated batches are cheap, all are made
    return self._batch([np.random.default_rng([seed, step, row]) for row in range(batch_size)], seq_len)

  def eval_batches(self, batch_size, seq_len):
    n = self.cfg.eval_examples
    rngs = [np.random.default_rng([EVAL_SEED, i]) for i in range(-(-n // batch_size) * batch_size)]
    batches = [self._batch(rngs[i:i + batch_size], seq_len) for i in range(0, len(rngs), batch_size)]
    for i, batch in enumerate(batches):  # rows past eval_examples only pad the last batch
      batch["loss_mask"][max(0, n - i * batch_size):] = 0
      batch["nbytes"] = batch["loss_mask"]
    return batches

  def prompts(self, n, length=None):
    """The pairs and the first query key of n eval examples."""
    rows = [self.make(np.random.default_rng([EVAL_SEED, i]), 4 * self.cfg.task_pairs, self.cfg.task_pairs)[0]
            for i in range(n)]
    return np.stack([r[:2 * self.cfg.task_pairs + 2] for r in rows])
