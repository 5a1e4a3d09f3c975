"""Token shards (train/shards.py): `prepare` then `tokens:DIR` gives the in-memory path's streams and batches,
refuses truncated or mismatched shards, resumes a killed prepare byte for byte, and reads only the windows a batch
needs from memory-mapped files."""

import dataclasses
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from altbench import cli
from altbench.train import config, data, mesh, shards
from altbench.train.config import ConfigError, DataConfig

from conftest import ROOT, SHAKESPEARE

WORDS = ["def", "return", "self", "café", "naïve", "漢字", "🙂", "x", "=", "(", ")", "\n", "    ", "über", "ß"]


def _make_folder(root, n=40, seed=0):
  """Nested UTF-8 files of multi-byte text, plus an empty and a whitespace-only one (both skipped)."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    sub = root / f"pkg{i % 3}" / ("deep" if i % 5 == 0 else "")
    sub.mkdir(parents=True, exist_ok=True)
    words = rng.choice(WORDS, size=int(rng.integers(20, 400)))
    (sub / f"mod{i}.py").write_text(" ".join(words), encoding="utf-8")
  (root / "empty.py").write_text("")
  (root / "blank.py").write_text("  \n\n")
  return str(root)


def _equal_corpora(a, b, seq_len, batch_size=6, steps=8):
  assert a.stats == b.stats
  assert np.array_equal(a.eval, b.eval)
  assert len(a.train) == len(b.train)
  for step in range(steps):
    x, y = a.train_batch(3, step, batch_size, seq_len), b.train_batch(3, step, batch_size, seq_len)
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), step
  for x, y in zip(a.eval_batches(batch_size, seq_len), b.eval_batches(batch_size, seq_len), strict=True):
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert np.array_equal(a.prompts(3, 16), b.prompts(3, 16))


def _tree_bytes(folder):
  out = {}
  for d, _, files in os.walk(folder):
    for f in files:
      path = os.path.join(d, f)
      out[os.path.relpath(path, folder)] = open(path, "rb").read()
  return out


@pytest.mark.parametrize("source", ["folder", "file"])
def test_tokens_batches_equal_the_in_memory_path(tmp_path, source):
  """Same documents, split, streams and batches; small shards so windows and documents cross shard boundaries."""
  src = _make_folder(tmp_path / "src") if source == "folder" else SHAKESPEARE
  if source == "file" and not os.path.exists(src):
    pytest.skip("no tinyshakespeare")
  out = str(tmp_path / "shards")
  size = 997 if source == "folder" else 99_991  # (fsync per shard: many tiny shards of 1 MB would be slow)
  manifest = shards.prepare(src, out, shard_tokens=size, heldout_fraction=0.1, progress=False)
  assert manifest["dtype"] == "uint16" and len(manifest["splits"]["train"]["shards"]) > 3
  cfg = DataConfig(dataset=f"text:{src}", seq_len=32, heldout_fraction=0.1, eval_bytes=1001)  # cuts a document
  memory = data.load_corpus(cfg)
  mapped = data.load_corpus(dataclasses.replace(cfg, dataset=f"tokens:{out}"))
  _equal_corpora(memory, mapped, cfg.seq_len)
  big = dataclasses.replace(cfg, eval_bytes=10 ** 9)  # every held-out document, whole
  _equal_corpora(data.load_corpus(big), data.load_corpus(dataclasses.replace(big, dataset=f"tokens:{out}")), 32)


@pytest.mark.parametrize("n_files", [1, 3])
def test_folders_too_small_for_a_hash_split_split_as_in_memory(tmp_path, n_files):
  """load_documents holds out the last file when the hash split leaves a split empty (one file: in both)."""
  src = _make_folder(tmp_path / "src", n=n_files)
  out = str(tmp_path / "shards")
  shards.prepare(src, out, shard_tokens=101, heldout_fraction=1e-6, progress=False)
  cfg = DataConfig(dataset=f"text:{src}", seq_len=8, heldout_fraction=1e-6, eval_bytes=300)
  _equal_corpora(data.load_corpus(cfg), data.load_corpus(dataclasses.replace(cfg, dataset=f"tokens:{out}")), 8)


def test_bpe_from_a_run_and_trained_by_prepare(tmp_path):
  src = _make_folder(tmp_path / "src", n=30)
  run = tmp_path / "run"
  cfg = DataConfig(dataset=f"text:{src}", tokenizer="bpe", bpe_vocab_size=300, seq_len=16, heldout_fraction=0.1,
                   eval_bytes=700)
  (run / "data").mkdir(parents=True)
  memory = data.load_corpus(cfg, str(run))  # trains and caches run/data/tokenizer.json
  out = str(tmp_path / "from_run")
  m = shards.prepare(src, out, tokenizer=f"bpe:{run}", heldout_fraction=0.1, shard_tokens=101, progress=False)
  assert m["tokenizer"]["kind"] == "bpe" and m["tokenizer"]["vocab_size"] == 300
  _equal_corpora(memory, data.load_corpus(dataclasses.replace(cfg, dataset=f"tokens:{out}"), str(run)), 16)
  trained = str(tmp_path / "trained")  # plain bpe trains on the training split, as load_corpus does
  shards.prepare(src, trained, tokenizer="bpe", bpe_vocab_size=300, heldout_fraction=0.1, progress=False)
  own = open(run / "data" / "tokenizer.json", "rb").read()
  assert open(os.path.join(trained, "tokenizer.json"), "rb").read() == own


def test_pystdlib_shards_equal_the_in_memory_path(tmp_path):
  out = str(tmp_path / "std")
  shards.prepare("pystdlib", out, shard_tokens=1 << 22, progress=False)
  cfg = DataConfig(dataset="pystdlib", seq_len=64, eval_bytes=20_000)
  _equal_corpora(data.load_corpus(cfg), data.load_corpus(dataclasses.replace(cfg, dataset=f"tokens:{out}")), 64,
                 steps=4)


@pytest.fixture
def prepared(tmp_path):
  src = _make_folder(tmp_path / "src", n=20)
  out = str(tmp_path / "shards")
  shards.prepare(src, out, shard_tokens=500, heldout_fraction=0.1, progress=False)
  return out, DataConfig(dataset=f"tokens:{out}", seq_len=16, heldout_fraction=0.1, eval_bytes=500)


def test_corpus_is_memory_mapped_and_batches_read_only_their_windows(prepared):
  out, cfg = prepared
  corpus = data.load_corpus(cfg)
  stream = corpus.train
  assert isinstance(stream, shards.TokenStream) and len(stream.shards) > 3
  assert all(isinstance(s, np.memmap) for s in stream.shards)
  stream.tokens_read = 0
  full = corpus.train_batch(0, 5, 8, cfg.seq_len)
  assert stream.tokens_read == 8 * (cfg.seq_len + 1)  # the windows, nothing else
  rows = np.array([1, 6])  # another process's rows are never read
  stream.tokens_read = 0
  mine = corpus.train_batch(0, 5, 8, cfg.seq_len, rows=rows)
  assert stream.tokens_read == 2 * (cfg.seq_len + 1)
  for k in full:
    assert np.array_equal(mine[k][rows], full[k][rows])


def test_process_rows_follow_the_batch_sharding():
  class Half:  # a process whose devices hold micro-batch rows 2..3 of 4
    def addressable_devices_indices_map(self, shape):
      return {0: (slice(None), slice(2, 3), slice(None)), 1: (slice(None), slice(3, 4), slice(None))}

  class All:
    def addressable_devices_indices_map(self, shape):
      return {0: (slice(None), slice(None), slice(None))}

  assert mesh.process_rows(Half(), 2, 4).tolist() == [2, 3, 6, 7]
  assert mesh.process_rows(All(), 2, 4) is None


def test_truncated_shard_is_refused_naming_the_file(prepared):
  out, cfg = prepared
  shard = os.path.join(out, "train", "00002.bin")
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 1)
  with pytest.raises(data.DataError, match=rf"{shard}: 999 bytes, but .*manifest.json lists 500 tokens of uint16"):
    data.load_corpus(cfg)


def test_changed_manifest_shard_or_tokenizer_is_refused(prepared, tmp_path):
  out, cfg = prepared
  path = os.path.join(out, "manifest.json")
  manifest = json.load(open(path))
  with pytest.raises(data.DataError, match=rf"{path}: the shards are tokenized with 'bytes', the run has "
                                           r"data.tokenizer='bpe'"):
    data.load_corpus(dataclasses.replace(cfg, tokenizer="bpe"))
  with pytest.raises(data.DataError, match=rf"{path}: prepared with --heldout-fraction 0.1"):
    data.load_corpus(dataclasses.replace(cfg, heldout_fraction=0.2))
  shard = os.path.join(out, "heldout", "00000.bin")
  blob = bytearray(open(shard, "rb").read())
  blob[3] ^= 1
  open(shard, "wb").write(bytes(blob))
  with pytest.raises(data.DataError, match=rf"{shard}: sha256 differs"):
    shards.verify(out)
  manifest["splits"]["train"]["tokens"] += 1
  json.dump(manifest, open(path, "w"))
  with pytest.raises(data.DataError, match=rf"{path}: the train shards' token counts do not add up"):
    data.load_corpus(cfg)


def test_run_with_another_bpe_tokenizer_is_refused(tmp_path):
  src = _make_folder(tmp_path / "src", n=12)
  out = str(tmp_path / "shards")
  shards.prepare(src, out, tokenizer="bpe", bpe_vocab_size=280, heldout_fraction=0.2, progress=False)
  cfg = DataConfig(dataset=f"tokens:{out}", tokenizer="bpe", bpe_vocab_size=280, heldout_fraction=0.2, seq_len=8)
  with pytest.raises(data.DataError, match=r"manifest.json: the shards' BPE tokenizer has 280 tokens, the run has "
                                           r"data.bpe_vocab_size=300"):
    data.load_corpus(dataclasses.replace(cfg, bpe_vocab_size=300))
  other = tmp_path / "run" / "data"
  other.mkdir(parents=True)
  data.BPETokenizer.train(["something else entirely " * 50], 280).save(str(other / "tokenizer.json"))
  with pytest.raises(data.DataError, match=rf"{other / 'tokenizer.json'}: the run's tokenizer differs"):
    data.load_corpus(cfg, str(tmp_path / "run"))
  data.load_corpus(cfg)  # without a run of its own it takes the shards' tokenizer


def test_killed_prepare_resumes_to_identical_shards(tmp_path):
  src = _make_folder(tmp_path / "src", n=30)
  clean = str(tmp_path / "clean")
  kw = dict(shard_tokens=300, heldout_fraction=0.1, progress=False)
  shards.prepare(src, clean, **kw)
  out = str(tmp_path / "killed")
  with pytest.raises(KeyboardInterrupt):
    shards.prepare(src, out, _stop_after_shards=4, **kw)
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  with pytest.raises(data.DataError, match="prepare did not finish: rerun"):
    shards.read_manifest(out)
  progress = json.load(open(os.path.join(out, "progress.json")))
  done = [s["file"] for split in progress["splits"].values() for s in split]
  assert len(done) == 4
  first, last = os.path.join(out, done[0]), os.path.join(out, done[-1])
  with open(last, "r+b") as f:  # the last finished shard cut short, as if its write had not finished ...
    f.truncate(100)
  open(os.path.join(out, "train", "09999.bin"), "wb").write(b"\0" * 7)  # ... and a stray half-written one
  kept = os.stat(first).st_mtime_ns
  with pytest.raises(KeyboardInterrupt):  # killed a second time
    shards.prepare(src, out, _stop_after_shards=2, **kw)
  shards.prepare(src, out, **kw)
  assert os.stat(first).st_mtime_ns == kept, "finished shards are kept"
  assert _tree_bytes(out) == _tree_bytes(clean)
  with pytest.raises(data.DataError, match="other settings"):
    os.remove(os.path.join(out, "manifest.json"))
    json.dump({"settings": {"shard_tokens": 1}, "splits": {}}, open(os.path.join(out, "progress.json"), "w"))
    shards.prepare(src, out, **kw)


def test_jsonl_source_and_its_errors(tmp_path):
  rows = [{"text": f"record {i} " + "é" * i, "id": i} for i in range(60)] + [{"text": "   "}]
  path = tmp_path / "docs.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  m = shards.prepare(str(path), str(tmp_path / "out"), heldout_fraction=0.2, progress=False)
  assert m["splits"]["train"]["docs"] + m["splits"]["heldout"]["docs"] == 60
  assert m["splits"]["heldout"]["docs"] > 0
  corpus = data.load_corpus(DataConfig(dataset=f"tokens:{tmp_path / 'out'}", heldout_fraction=0.2, seq_len=8))
  assert corpus.tokenizer.decode(corpus.eval[1:]).startswith("record ")
  with pytest.raises(data.DataError, match=rf"{path}, line 1: no field 'body'; use --text-field"):
    shards.prepare(str(path), str(tmp_path / "o2"), text_field="body", progress=False)
  if importlib.util.find_spec("pyarrow") is None:
    pq = tmp_path / "docs.parquet"
    pq.write_bytes(b"PAR1")
    with pytest.raises(data.DataError, match=rf"{pq}: reading Parquet needs pyarrow \(pip install pyarrow\)"):
      shards.prepare(str(pq), str(tmp_path / "o3"), progress=False)


def test_config_accepts_tokens_and_names_what_is_missing(tmp_path, prepared):
  from conftest import tiny_config
  base = tiny_config()
  ok = dataclasses.replace(base, data=dataclasses.replace(base.data, dataset=f"tokens:{prepared[0]}"))
  config.validate(ok)
  missing = dataclasses.replace(base, data=dataclasses.replace(base.data, dataset=f"tokens:{tmp_path / 'nope'}"))
  with pytest.raises(ConfigError, match="folder .*nope' does not exist .*altbench prepare"):
    config.validate(missing)
  (tmp_path / "half").mkdir()
  (tmp_path / "half" / "progress.json").write_text("{}")
  half = dataclasses.replace(base, data=dataclasses.replace(base.data, dataset=f"tokens:{tmp_path / 'half'}"))
  with pytest.raises(ConfigError, match="manifest.json does not exist \\(prepare did not finish"):
    config.validate(half)


def test_cli_prepare(tmp_path, capsys):
  src = _make_folder(tmp_path / "src", n=10)
  out = str(tmp_path / "out")
  assert cli.main(["prepare", src, "--out", out, "--shard-tokens", "400"]) == 0
  text = capsys.readouterr()
  assert f"train with --set data.dataset=tokens:{out} --set data.tokenizer=bytes" in text.out
  assert "prepare: 100.0%" in text.err
  digest = hashlib.sha256(open(os.path.join(out, "manifest.json"), "rb").read()).hexdigest()
  assert cli.main(["prepare", src, "--out", out, "--shard-tokens", "400"]) == 0  # done: verified, unchanged
  assert hashlib.sha256(open(os.path.join(out, "manifest.json"), "rb").read()).hexdigest() == digest
  assert cli.main(["prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["prepare", src, "--out", out, "--shard-tokens", "400", "--heldout-fraction", "0.5"]) == 2
  assert "manifest.json: already prepared with other settings ({'heldout_fraction': (0.02, 0.5)}" in \
      capsys.readouterr().err


@pytest.mark.slow
def test_prepare_killed_by_a_signal_resumes_to_identical_shards(tmp_path):
  """A real SIGKILL of `altbench prepare` mid-way; the rerun finishes the same shards as an uninterrupted one."""
  argv = [sys.executable, "-m", "altbench.cli", "prepare", "pystdlib", "--shard-tokens", str(1 << 18)]
  subprocess.run(argv + ["--out", str(tmp_path / "clean")], check=True, cwd=ROOT, capture_output=True)
  out = str(tmp_path / "killed")
  proc = subprocess.Popen(argv + ["--out", out], cwd=ROOT, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
  progress = os.path.join(out, "progress.json")
  deadline = time.time() + 120
  while time.time() < deadline:
    try:
      if len(json.load(open(progress))["splits"]["train"]) >= 5:
        break
    except (OSError, ValueError, KeyError):
      pass
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(out, "manifest.json")), "killed before it finished"
  subprocess.run(argv + ["--out", out], check=True, cwd=ROOT, capture_output=True)
  assert _tree_bytes(out) == _tree_bytes(str(tmp_path / "clean"))


@pytest.mark.slow
def test_training_on_tokens_matches_training_on_text(tmp_path):
  """The loop end to end: the same losses and held-out bpb from `tokens:DIR` as from `text:` on the same file."""
  from altbench.train import loop, metrics
  from conftest import tiny_config
  text_cfg = tiny_config(steps=4)
  src = text_cfg.data.dataset[len("text:"):]
  if text_cfg.data.dataset == "pystdlib":
    pytest.skip("no tinyshakespeare")
  out = str(tmp_path / "shards")
  shards.prepare(src, out, shard_tokens=50_021, heldout_fraction=text_cfg.data.heldout_fraction, progress=False)
  tokens_cfg = dataclasses.replace(text_cfg, data=dataclasses.replace(text_cfg.data, dataset=f"tokens:{out}"))
  logs = []
  for name, cfg in (("text", text_cfg), ("tokens", tokens_cfg)):
    loop.train(cfg, str(tmp_path / name), log=lambda *a, **k: None)
    rows = metrics.read_jsonl(str(tmp_path / name / "metrics.jsonl"))
    logs.append([{k: v for k, v in r.items() if k in ("step", "loss", "eval_bpb", "eval_loss")} for r in rows])
  assert logs[0] == logs[1] and any("eval_bpb" in r for r in logs[0])


@pytest.mark.slow
def test_two_processes_on_tokens_match_one_device_on_text(tmp_path):
  """2 processes x 2 CPU devices, each filling only its own rows from the shards: the 1-device text: curve."""
  from test_distributed import _assert_same_curve, _free_port, _launch, _wait
  corpus = tmp_path / "tiny.txt"
  rng = np.random.default_rng(0)
  corpus.write_text("\n".join(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(3000)))
  out = str(tmp_path / "shards")
  shards.prepare(str(corpus), out, shard_tokens=10_007, progress=False)
  port, multi = _free_port(), tmp_path / "multi"
  procs = [_launch(tmp_path / "ref", corpus)] + [
      _launch(multi, corpus, "--cpu-devices", "2", "--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--set",
              f"data.dataset=tokens:{out}", "--coordinator", f"localhost:{port}", "--num-processes", "2",
              "--process-id", str(i), log=f"{multi}.process{i}.log") for i in range(2)]
  _wait(procs)
  _assert_same_curve(multi, tmp_path / "ref")
