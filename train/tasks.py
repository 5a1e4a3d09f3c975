"""Generated tasks as datasets: no download, examples a pure function of (seed, step), accuracy as a metric.

`mqar`: multi-query associative recall as in the Zoology benchmark (Arora et al., 2023): key-value pairs,
then the keys again in random order; the model must answer each key with its value. Keys are byte ids
0..127 and values 128..255, so the byte tokenizer serves every family. Only answers carry loss; the
loop reports `eval_acc`, the fraction of answers predicted exactly (argmax).

`mqar-zoology`: the same task laid out as Zoology's figure-2 generator (HazyResearch/zoology,
`zoology/data/multiquery_ar.py`, with `random_non_queries=False` as in
`zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py`): a vocabulary of 8192 ids, keys drawn
without replacement from 1..4095 and values from 4096..8191, the pairs first, then every key queried once at a
slot drawn by a power law that favours short gaps, filler id 0 everywhere else. The value is the target at its
query's position and never enters the input; only those positions carry loss. `data.task_size` sets the
vocabulary (0: Zoology's 8192), the size axis a CPU run may scale (experiments/mqar.py).

`phop`: p-hop induction (Sanford et al., 2024, "Transformers, Parallel Computation, and Logarithmic Depth"; the
task of Saunshi et al., 2025, "Reasoning with Latent Thoughts"). `seq_len` letters from the alphabet a..d, then
the answer: hop_p at the last position. One hop from position i goes to the token right after the latest earlier
occurrence of x[i] (find(i) = max{j <= i : x[j-1] = x[i]}); p hops from the last letter, the answer is the letter
there. No letter repeats its predecessor (otherwise x[i-1] = x[i] makes find(i) = i, a hop that stays put), and a
sequence whose chain runs off the start is drawn again, so every answer takes exactly p hops. `data.task_hops` is
p. The answer is predicted at the last letter's position (no separator), so every letter fills the input window.
`phop-all`: the same rows, trained with hop_p at every position as the target (Sanford et al.'s hop_p is a function
of every position; positions whose chain runs off the start carry no loss), scored at the last position only, as
`phop`: many answers per row instead of one, for budgets too small to learn from the last position alone.
"""

import functools

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


ZOOLOGY_VOCAB = 8192  # Zoology's VOCAB_SIZE in the figure-2 configs
ZOOLOGY_POWER_A = 0.01  # Zoology's train_power_a = test_power_a in the figure-2 configs


def mqar_zoology_example(rng, seq_len, pairs, vocab=ZOOLOGY_VOCAB, power_a=ZOOLOGY_POWER_A):
  """(inputs (seq_len,), targets (seq_len,), answer_mask (seq_len,)) in Zoology's MQAR layout.

  inputs: k_1 v_1 ... k_p v_p, then seq_len - 2p slots of filler 0 where key k_i sits at offset 2 * gap_i; the
  gaps are distinct, drawn with probability proportional to (gap + 1) ** (power_a - 1). targets[t] is the value
  of the key at t where answer_mask[t], else 0.
  """
  half = vocab // 2
  keys = 1 + rng.choice(half - 1, size=pairs, replace=False)
  values = half + rng.choice(vocab - half, size=pairs, replace=False)
  context = 2 * pairs
  slots = (seq_len - context) // 2
  weight = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
  gaps = rng.choice(slots, size=pairs, replace=False, p=weight / weight.sum())
  inputs = np.zeros(seq_len, np.int32)
  inputs[0:context:2], inputs[1:context:2] = keys, values
  at = context + 2 * gaps
  inputs[at] = keys
  targets = np.zeros(seq_len, np.int32)
  targets[at] = values
  answer = np.zeros(seq_len, bool)
  answer[at] = True
  return inputs, targets, answer


class TaskVocab:
  """The ids of a task with its own vocabulary (mqar-zoology: 0..8191, 0 the filler) and no special tokens."""

  name = "task"

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size
    self.special = {}
    self.token_nbytes = np.ones(vocab_size, np.int32)

  def decode(self, ids):
    return " ".join(str(int(i)) for i in ids)


PHOP_LETTERS = np.frombuffer(b"abcd", np.uint8).astype(np.int32)


def hop_positions(letters, hops):
  """The positions p-hop visits from the last letter (hops + 1 of them), or None when a hop finds no earlier
  occurrence. letters: (n,) ints."""
  last, prev = {}, np.full(len(letters), -1)
  for i, c in enumerate(letters):  # prev[i]: the latest j < i with letters[j] == letters[i]
    prev[i] = last.get(c, -1)
    last[c] = i
  path = [len(letters) - 1]
  for _ in range(hops):
    j = prev[path[-1]]
    if j < 0:
      return None
    path.append(j + 1)
  return path


def phop_example(rng, seq_len, hops):
  """(tokens (seq_len,), answer_mask): seq_len - 1 letters, then the p-hop answer at the last letter."""
  n, k = seq_len - 1, len(PHOP_LETTERS)
  for _ in range(10_000):
    steps = rng.integers(1, k, size=n)  # each letter differs from its predecessor: a shift of 1..k-1
    steps[0] = rng.integers(0, k)
    idx = np.cumsum(steps) % k
    path = hop_positions(idx, hops)
    if path is not None:
      break
  else:
    raise ValueError(f"phop: no sequence of {n} letters in 10,000 draws has a {hops}-hop chain")
  tokens = np.concatenate([PHOP_LETTERS[idx], PHOP_LETTERS[idx[path[-1]]][None]])
  answer = np.zeros(seq_len, bool)
  answer[-1] = True
  return tokens.astype(np.int32), answer


def phop_all_example(rng, seq_len, hops):
  """(inputs (seq_len,), targets (seq_len,), mask (seq_len,)): `phop`'s letters, hop_p at every position."""
  letters = phop_example(rng, seq_len + 1, hops)[0][:-1]
  last, find = {}, np.full(seq_len, -1)
  for i, c in enumerate(letters):  # find[i]: one hop from i, the position after the latest earlier x[i]
    find[i] = last[c] + 1 if c in last else -1
    last[c] = i
  pos = np.arange(seq_len)
  for _ in range(hops):
    pos = np.where(pos >= 0, find[np.maximum(pos, 0)], -1)
  return letters, np.where(pos >= 0, letters[np.maximum(pos, 0)], 0).astype(np.int32), pos >= 0


TASKS = {"mqar": mqar_example, "mqar-zoology": mqar_zoology_example, "phop": phop_example,
         "phop-all": phop_all_example, **reasoning_tasks.TASKS}
# reach, mult, vartrack: see train/reasoning_tasks.py
# the DataConfig field each generator takes
TASK_ARG = {"mqar": "task_pairs", "mqar-zoology": "task_pairs", "phop": "task_hops", "phop-all": "task_hops"}


class TaskCorpus:
  """Batches of generated examples, padded to seq_len + 1 tokens; loss only on the answers."""

  def __new__(cls, data_cfg):
    if data_cfg.dataset in reasoning_tasks.TASKS:  # reasoning tasks have their own corpus (same interface)
      return reasoning_tasks.ReasoningCorpus(data_cfg)
    return super().__new__(cls)

  def __init__(self, data_cfg):
    self.cfg = data_cfg
    self.zoology = data_cfg.dataset == "mqar-zoology"
    vocab = data_cfg.task_size or ZOOLOGY_VOCAB
    self.tokenizer = TaskVocab(vocab) if self.zoology else ByteTokenizer()
    if self.zoology and (vocab % 2 or vocab <= data_cfg.seq_len or vocab // 2 - 1 < data_cfg.task_pairs):
      raise ValueError(f"data.task_size={data_cfg.task_size}: mqar-zoology's vocabulary {vocab} must be even, above "
                       f"data.seq_len={data_cfg.seq_len} and hold data.task_pairs={data_cfg.task_pairs} distinct keys "
                       "in its lower half (Zoology's asserts)")
    if data_cfg.dataset in ("mqar", "mqar-zoology") and data_cfg.seq_len < 4 * data_cfg.task_pairs:
      raise ValueError(f"data.seq_len={data_cfg.seq_len}: {data_cfg.dataset} with "
                       f"data.task_pairs={data_cfg.task_pairs} needs at least {4 * data_cfg.task_pairs} (pairs, then "
                       "as many queries)")
    if data_cfg.dataset in ("phop", "phop-all") and data_cfg.seq_len < 4 * data_cfg.task_hops:
      raise ValueError(f"data.seq_len={data_cfg.seq_len}: phop with data.task_hops={data_cfg.task_hops} needs at "
                       f"least {4 * data_cfg.task_hops} letters (a hop goes back about 3 letters on average)")
    self.make = functools.partial(mqar_zoology_example, vocab=vocab) if self.zoology else TASKS[data_cfg.dataset]
    self.arg = getattr(data_cfg, TASK_ARG[data_cfg.dataset])
    self.eval_bytes = 0
    self.stats = {"task": data_cfg.dataset, TASK_ARG[data_cfg.dataset].removeprefix("task_"): self.arg,
                  "eval_examples": data_cfg.eval_examples,
                  "train_tokens": "generated", "vocab_size": self.tokenizer.vocab_size}

  def _batch(self, rngs, seq_len):
    if self.cfg.dataset == "phop-all":  # targets apart from the inputs: hop_p of every position
      inputs, targets, mask = (np.stack(x) for x in zip(*[self.make(rng, seq_len, self.arg) for rng in rngs]))
      return {"inputs": inputs, "targets": targets, "segment_ids": np.ones_like(inputs),
              "loss_mask": mask.astype(np.int32), "nbytes": mask.astype(np.int32)}
    if self.zoology:  # inputs and targets apart: the answers never enter the input
      inputs, targets, answers = (np.stack(x) for x in zip(*[self.make(rng, seq_len, self.cfg.task_pairs)
                                                             for rng in rngs]))
      loss_mask = answers.astype(np.int32)
      return {"inputs": inputs, "targets": targets, "segment_ids": np.ones_like(inputs), "loss_mask": loss_mask,
              "nbytes": loss_mask}
    pad = self.tokenizer.special["<pad>"]
    windows = np.full((len(rngs), seq_len + 1), pad, np.int32)
    answers = np.zeros((len(rngs), seq_len + 1), bool)
    for row, rng in enumerate(rngs):
      tokens, answer = self.make(rng, seq_len + 1, self.arg)
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
      if self.cfg.dataset == "phop-all":  # scored as phop: the last position's answer only
        batch["loss_mask"][:, :-1] = 0
      batch["loss_mask"][max(0, n - i * batch_size):] = 0
      batch["nbytes"] = batch["loss_mask"]
    return batches

  def prompts(self, n, length=None):
    """mqar: the pairs and the first query key of n eval examples; mqar-zoology: the pairs and the first slot;
    phop: the letters."""
    if self.zoology:
      pairs = self.cfg.task_pairs
      return np.stack([self.make(np.random.default_rng([EVAL_SEED, i]), self.cfg.seq_len, pairs)[0][:2 * pairs + 1]
                       for i in range(n)])
    if self.cfg.dataset in ("phop", "phop-all"):  # the letters of n eval examples
      return np.stack([phop_example(np.random.default_rng([EVAL_SEED, i]), self.cfg.seq_len + 1, self.arg)[0][:-1]
                       for i in range(n)])
    rows = [self.make(np.random.default_rng([EVAL_SEED, i]), 4 * self.cfg.task_pairs, self.cfg.task_pairs)[0]
            for i in range(n)]
    return np.stack([r[:2 * self.cfg.task_pairs + 2] for r in rows])
