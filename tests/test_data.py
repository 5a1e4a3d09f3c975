"""Data: corpus splits, tokenizers, batches as a pure function of (seed, step), bits per byte."""

import math

import numpy as np
import pytest

from altbench.train import data, metrics
from altbench.train.config import DataConfig

from conftest import SHAKESPEARE


def test_pystdlib_split_shares_no_file():
  train, heldout = data.load_documents("pystdlib", 0.02)
  train_names, heldout_names = {n for n, _ in train}, {n for n, _ in heldout}
  assert train_names and heldout_names and not train_names & heldout_names
  assert sum(len(t) for _, t in train) > 5_000_000  # a real corpus, not a stub
  # The split is by a fixed hash of the path: the same again, and independent of the file list order.
  assert {n for n, _ in data.load_documents("pystdlib", 0.02)[1]} == heldout_names
  assert all(data._hash_fraction(n) < 0.02 for n in heldout_names)


def test_bits_per_byte_closed_form():
  # A uniform predictor over 256 byte values pays ln(256) nats per byte: exactly 8 bits per byte.
  assert metrics.bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
  # Tokens of 4 bytes each at ln(2) nats per token: 1/4 bit per byte.
  assert metrics.bits_per_byte(50 * math.log(2), 200) == pytest.approx(0.25)


def test_batches_are_a_pure_function_of_seed_and_step():
  tok = data.ByteTokenizer()
  stream = data.token_stream(tok, ["hello world " * 50, "second doc " * 40])
  a = data.train_batch(stream, tok, 7, 3, 4, 32)
  b = data.train_batch(stream, tok, 7, 3, 4, 32)
  c = data.train_batch(stream, tok, 7, 4, 4, 32)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["inputs"], c["inputs"])
  np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
  # Segment ids change exactly at <eos>, the token that opens each document.
  eos = tok.special["<eos>"]
  steps = np.diff(a["segment_ids"], axis=1)
  np.testing.assert_array_equal(steps, (a["inputs"][:, 1:] == eos).astype(int))


def test_eval_batches_score_every_token_once():
  tok = data.ByteTokenizer()
  text = "abcdefghij" * 37
  stream = data.token_stream(tok, [text])
  batches = data.eval_batches(stream, tok, 4, 16)
  scored = np.concatenate([b["targets"][b["loss_mask"] == 1] for b in batches])
  np.testing.assert_array_equal(scored, stream[1:])
  assert sum(int(b["nbytes"].sum()) for b in batches) == len(text.encode())


def test_eval_text_is_the_same_bytes_for_every_tokenizer():
  _, heldout = data.load_documents("pystdlib", 0.02)
  texts = data.eval_text(heldout, 10_000)
  assert 9_990 <= sum(len(t.encode()) for t in texts) <= 10_000


def test_bpe_tokenizer_counts_bytes_exactly(tmp_path):
  sample = "To be, or not to be: that is the question — café ünïcode"
  # Without the shared data, a corpus that shares words with the sample, so that merges apply to it.
  fallback = ["To be or not to be, the question of the café; ünïcode, déf " * 2000]
  texts = [open(SHAKESPEARE).read()[:200_000]] if __import__("os").path.exists(SHAKESPEARE) else fallback
  tok = data.BPETokenizer.train(texts, 400)
  ids = tok.encode(sample)
  assert tok.decode(ids) == sample
  assert int(tok.token_nbytes[ids].sum()) == len(sample.encode())
  assert len(ids) < len(sample.encode())  # merges happened
  tok.save(str(tmp_path / "tok.json"))
  again = data.BPETokenizer.load(str(tmp_path / "tok.json"))
  np.testing.assert_array_equal(again.encode(sample), ids)
  assert all(tok.token_nbytes[tok.special[s]] == 0 for s in data.SPECIALS)


def test_text_dataset_errors(tmp_path):
  with pytest.raises(data.DataError, match="does not exist"):
    data.load_documents(f"text:{tmp_path / 'missing.txt'}", 0.1)
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n")
  with pytest.raises(data.DataError, match="is empty"):
    data.load_documents(f"text:{empty}", 0.1)
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
  with pytest.raises(data.DataError, match=r"latin1.txt: not UTF-8 \(byte 3"):
    data.load_documents(f"text:{latin}", 0.1)


def test_text_folder_splits_by_file(tmp_path):
  for i in range(40):
    (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * 10)
  train, heldout = data.load_documents(f"text:{tmp_path}", 0.2)
  assert heldout and train and not {n for n, _ in train} & {n for n, _ in heldout}
  corpus = data.load_corpus(DataConfig(dataset=f"text:{tmp_path}", eval_bytes=100))
  assert corpus.eval_bytes == 100
