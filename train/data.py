"""Corpora, tokenizers and batches. Batches are a pure function of (seed, step): resume needs no loader state.

Datasets: `pystdlib` (the running Python's standard-library .py files, split into train and held-out by a
fixed hash of each file's relative path), `text:PATH` (a UTF-8 file or a folder of them) and `tokens:DIR`
(shards `altbench prepare` wrote, memory-mapped: train/shards.py; the same streams and batches as in memory).
Documents are joined into one token stream, each preceded by <eos> (which doubles as the beginning-of-document token);
training windows are drawn at random offsets from that stream, so no batch carries padding, and
`segment_ids` let attention stay inside a document. Eval scores a fixed prefix of the held-out bytes,
the same bytes for every tokenizer, so bits per byte compare across families.
"""

import dataclasses
import hashlib
import json
import os
import sysconfig

import numpy as np

SPECIALS = ("<eos>", "<pad>", "<mask>", "<bot>", "<eot>", "<pause>")


class DataError(ValueError):
  """A missing, empty or undecodable data path."""


def byte_to_unicode():
  """The printable-character alphabet byte-level BPE uses for the 256 byte values (GPT-2's convention)."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


class ByteTokenizer:
  """Ids 0..255 are the bytes; the specials follow."""

  name = "bytes"

  def __init__(self):
    self.vocab_size = 256 + len(SPECIALS)
    self.special = {s: 256 + i for i, s in enumerate(SPECIALS)}
    self.token_nbytes = np.array([1] * 256 + [0] * len(SPECIALS), np.int32)

  def encode(self, text):
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids):
    ids = [int(i) for i in ids]
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
  """Byte-level BPE from Hugging Face `tokenizers`, trained on the training split and saved as JSON."""

  name = "bpe"

  def __init__(self, tok):
    self.tok = tok
    self.vocab_size = tok.get_vocab_size()
    self.special = {s: tok.token_to_id(s) for s in SPECIALS}
    inverse = {c: b for b, c in byte_to_unicode().items()}
    nbytes = np.zeros(self.vocab_size, np.int32)
    for token, idx in tok.get_vocab().items():
      if token not in self.special:
        nbytes[idx] = len(token)  # one alphabet character per byte
        assert all(c in inverse for c in token), token
    self.token_nbytes = nbytes

  @classmethod
  def train(cls, texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return cls(tok)

  @classmethod
  def load(cls, path):
    from tokenizers import Tokenizer
    return cls(Tokenizer.from_file(path))

  def save(self, path):
    tmp = path + ".tmp"
    self.tok.save(tmp)
    os.replace(tmp, path)

  def encode(self, text):
    return np.array(self.tok.encode(text).ids, np.int32)

  def decode(self, ids):
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _hash_fraction(name):
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


def _read_utf8(path):
  try:
    with open(path, "rb") as f:
      return f.read().decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 (byte {e.start}: {e.reason}); text: datasets must be UTF-8") from None


def pystdlib_root():
  return sysconfig.get_paths()["stdlib"]


def pystdlib_files():
  """Sorted relative paths of the stdlib's .py files, without site-packages and caches."""
  root, out = pystdlib_root(), []
  for d, dirs, files in os.walk(root):
    dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
    out += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
  return sorted(out)


def load_documents(dataset, heldout_fraction):
  """(train_docs, heldout_docs): lists of (name, text). Held-out files never appear in train."""
  if dataset == "pystdlib":
    root, train, heldout = pystdlib_root(), [], []
    for rel in pystdlib_files():
      try:
        text = _read_utf8(os.path.join(root, rel))
      except DataError:
        continue  # a few stdlib test files are deliberately in other encodings
      (heldout if _hash_fraction(rel) < heldout_fraction else train).append((rel, text))
    return train, heldout
  if not dataset.startswith("text:"):
    raise DataError(f"data.dataset={dataset!r}: valid: 'pystdlib', 'text:PATH' or 'tokens:DIR'")
  path = dataset[len("text:"):]
  if not os.path.exists(path):
    raise DataError(f"data.dataset={dataset!r}: path {path!r} does not exist")
  if os.path.isfile(path):
    text = _read_utf8(path)
    if not text.strip():
      raise DataError(f"data.dataset={dataset!r}: file {path!r} is empty")
    cut = text.rfind("\n", 0, int(len(text) * (1 - heldout_fraction))) + 1 or int(len(text) * (1 - heldout_fraction))
    return [(path, text[:cut])], [(path + "#heldout", text[cut:])]
  names = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
                 if not f.startswith("."))
  docs = [(n, _read_utf8(os.path.join(path, n))) for n in names]
  docs = [(n, t) for n, t in docs if t.strip()]
  if not docs:
    raise DataError(f"data.dataset={dataset!r}: folder {path!r} has no non-empty files")
  heldout = [d for d in docs if _hash_fraction(d[0]) < heldout_fraction]
  train = [d for d in docs if _hash_fraction(d[0]) >= heldout_fraction]
  if not heldout or not train:  # too few files for a hash split: hold out the last one
    train, heldout = docs[:-1] or docs, docs[-1:]
  return train, heldout


def eval_text(heldout_docs, eval_bytes):
  """The first eval_bytes bytes of the held-out documents (cut at a character boundary)."""
  out, total = [], 0
  for _, text in heldout_docs:
    data = text.encode("utf-8")[: eval_bytes - total]
    out.append(data.decode("utf-8", errors="ignore"))
    total += len(out[-1].encode("utf-8"))
    if total >= eval_bytes:
      break
  return out


def token_stream(tokenizer, texts):
  """One int32 array: <eos> doc <eos> doc ... (<eos> starts each document)."""
  eos = tokenizer.special["<eos>"]
  parts = []
  for text in texts:
    parts += [np.array([eos], np.int32), tokenizer.encode(text)]
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def _make_batch(windows, tokenizer, pad_mask=None):
  inputs, targets = windows[:, :-1], windows[:, 1:]
  loss_mask = np.ones_like(targets, np.int32) if pad_mask is None else pad_mask[:, 1:].astype(np.int32)
  return {
      "inputs": inputs.astype(np.int32),
      "targets": targets.astype(np.int32),
      "segment_ids": np.cumsum(inputs == tokenizer.special["<eos>"], axis=1).astype(np.int32),
      "loss_mask": loss_mask,
      "nbytes": tokenizer.token_nbytes[targets] * loss_mask,
  }


def train_batch(stream, tokenizer, seed, step, batch_size, seq_len, rows=None):
  """The batch of training step `step`: random windows of seq_len + 1 tokens, a pure function of (seed, step).

  rows: the rows of the global batch this process reads (None: all); the others are left <eos>, never read.
  """
  if len(stream) < seq_len + 2:
    raise DataError(f"the training split has {len(stream)} tokens, fewer than data.seq_len + 2 = {seq_len + 2}")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
  take = getattr(stream, "windows", lambda s, n: stream[s[:, None] + np.arange(n)])  # shards.TokenStream: memmaps
  if rows is None:
    return _make_batch(take(starts, seq_len + 1), tokenizer)
  windows = np.full((batch_size, seq_len + 1), tokenizer.special["<eos>"], np.int32)
  windows[rows] = take(starts[rows], seq_len + 1)
  return _make_batch(windows, tokenizer)


def eval_batches(stream, tokenizer, batch_size, seq_len):
  """Every token of the eval stream exactly once: windows of seq_len + 1 with stride seq_len, padded."""
  pad = tokenizer.special["<pad>"]
  n_windows = max(1, -(-(len(stream) - 1) // seq_len))
  n_rows = -(-n_windows // batch_size) * batch_size
  padded = np.full(n_rows * seq_len + 1, pad, np.int32)
  padded[: len(stream)] = stream
  valid = np.zeros(n_rows * seq_len + 1, bool)
  valid[: len(stream)] = True
  idx = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)
  windows, mask = padded[idx], valid[idx]
  return [_make_batch(windows[i:i + batch_size], tokenizer, mask[i:i + batch_size])
          for i in range(0, n_rows, batch_size)]


@dataclasses.dataclass
class Corpus:
  """A text corpus: tokenizer, the training token stream and the scored held-out stream."""
  tokenizer: object
  train: np.ndarray            # token stream of the training split (tokens:DIR: a shards.TokenStream over memmaps)
  eval: np.ndarray             # token stream of the scored held-out bytes
  eval_bytes: int
  stats: dict

  def train_batch(self, seed, step, batch_size, seq_len, rows=None):
    return train_batch(self.train, self.tokenizer, seed, step, batch_size, seq_len, rows)

  def eval_batches(self, batch_size, seq_len):
    return eval_batches(self.eval, self.tokenizer, batch_size, seq_len)

  def prompts(self, n, length=32):
    """Openings of the first n held-out documents, cut to a common length."""
    starts = np.flatnonzero(self.eval == self.tokenizer.special["<eos>"])[:n]
    prompts = [self.eval[s:s + length] for s in starts]
    width = min(len(p) for p in prompts)
    return np.stack([p[:width] for p in prompts])


def load_corpus(data_cfg, workdir=None):
  """Tokenizer and token streams for a DataConfig; a trained BPE tokenizer is cached in workdir/data/."""
  from altbench.train import tasks
  if data_cfg.dataset in tasks.TASKS:
    return tasks.TaskCorpus(data_cfg)
  if data_cfg.dataset.startswith("tokens:"):  # prepared shards (train/shards.py), memory-mapped
    from altbench.train import shards
    return shards.load_corpus(data_cfg, workdir)
  train_docs, heldout_docs = load_documents(data_cfg.dataset, data_cfg.heldout_fraction)
  texts = eval_text(heldout_docs, data_cfg.eval_bytes)
  if data_cfg.tokenizer == "bytes":
    tokenizer = ByteTokenizer()
  else:
    path = os.path.join(workdir, "data", "tokenizer.json") if workdir else None
    if path and os.path.exists(path):
      tokenizer = BPETokenizer.load(path)
    else:
      tokenizer = BPETokenizer.train((t for _, t in train_docs), data_cfg.bpe_vocab_size)
      if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tokenizer.save(path)
  train = token_stream(tokenizer, [t for _, t in train_docs])
  evals = token_stream(tokenizer, texts)
  eval_bytes = int(tokenizer.token_nbytes[evals].sum())
  stats = {"train_docs": len(train_docs), "heldout_docs": len(heldout_docs), "train_tokens": int(len(train)),
           "eval_tokens": int(len(evals)), "eval_bytes": eval_bytes, "vocab_size": tokenizer.vocab_size,
           "train_bytes_per_token": float(tokenizer.token_nbytes[train].sum() / max(len(train), 1)),
           "pad_fraction_train": 0.0}
  return Corpus(tokenizer, train, evals, eval_bytes, stats)


def save_stats(corpus, workdir):
  path = os.path.join(workdir, "data", "stats.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(corpus.stats, f, indent=1)
  os.replace(path + ".tmp", path)
