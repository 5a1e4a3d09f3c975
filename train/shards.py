"""Token shards: a corpus tokenized once into fixed-size memory-mapped files, read back without loading it.

`prepare(src, out)` writes, for each split (train, held-out; documents split as `load_documents` splits them):

  DIR/manifest.json            written last: source, tokenizer (kind, sha256 of tokenizer.json, vocabulary), dtype,
                               shard_tokens, heldout_fraction, per split its docs / tokens / token bytes and its
                               shards with their sizes and sha256
  DIR/tokenizer.json           the BPE tokenizer (bpe only)
  DIR/<split>/NNNNN.bin        raw tokens, the smallest unsigned dtype that holds the vocabulary; every shard holds
                               exactly shard_tokens tokens but the last. Concatenated they are the split's token
                               stream `data.token_stream` builds: <eos> doc <eos> doc ...
  DIR/<split>/NNNNN.idx.npy    int64 (docs, 2): (stream offset, UTF-8 bytes) of each document starting in the shard
  DIR/progress.json            while preparing: finished shards and where the stream resumes after the last one

A killed `prepare` keeps its finished shards (each committed to progress.json after its file is complete) and redoes
the rest from the document and token offset where the last finished shard ends, so the shards come out byte for
byte the same. `load_corpus` memory-maps the shards: training windows are gathered by offset (`TokenStream`), so
host memory does not grow with the corpus; the scored held-out stream (at most data.eval_bytes bytes) is rebuilt
from the held-out shards exactly as `data.eval_text` cuts it.
"""

import hashlib
import json
import os
import sys
import time

import numpy as np

from altbench.train import data
from altbench.train.data import DataError

FORMAT = 1
SPLITS = ("train", "heldout")
TRAIN, HELDOUT = 1, 2  # split codes of a document (a lone document is in both: 3)


# ---------------------------------------------------------------------------------------------------- documents

def _records(path, text_field):
  """(name, text) of each record of a JSONL or Parquet file; the name is file:record-number."""
  base = os.path.basename(path)
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq
    except ImportError:
      raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), which is not installed") from None
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
      raise DataError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); use --text-field")
    i = 0
    for batch in pf.iter_batches(columns=[text_field]):
      for text in batch.column(0).to_pylist():
        yield f"{base}:{i}", text or ""
        i += 1
    return
  with open(path, "rb") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        text = rec[text_field]
      except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}, line {i + 1}: not a JSON object ({e})") from None
      except (KeyError, TypeError):
        raise DataError(f"{path}, line {i + 1}: no field {text_field!r}; use --text-field") from None
      if not isinstance(text, str):
        raise DataError(f"{path}, line {i + 1}: field {text_field!r} is {type(text).__name__}, not a string")
      yield f"{base}:{i}", text


def _folder_names(src):
  return sorted(os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs
                if not f.startswith("."))


def _texts(src, text_field):
  """(name, text) of the non-empty documents of a folder or a JSONL / Parquet file, lazily, in order."""
  if os.path.isfile(src):
    return ((n, t) for n, t in _records(src, text_field) if t.strip())
  return ((n, t) for n, t in ((n, data._read_utf8(os.path.join(src, n))) for n in _folder_names(src)) if t.strip())


def source_bytes(src):
  """The source's text in bytes, for the progress line (None for JSONL / Parquet: not known before reading)."""
  if src == "pystdlib":
    root = data.pystdlib_root()
    return sum(os.path.getsize(os.path.join(root, rel)) for rel in data.pystdlib_files())
  if os.path.isfile(src):
    return None if src.endswith((".jsonl", ".parquet")) else os.path.getsize(src)
  return sum(os.path.getsize(os.path.join(src, n)) for n in _folder_names(src))


def documents(src, heldout_fraction, text_field="text"):
  """(name, text, split code) of every document of src, lazily, in `data.load_documents`'s order and split.

  src: "pystdlib", a UTF-8 file (its tail is held out), a folder (recursively) or a .jsonl / .parquet file with a
  text field (both split by a hash of the document's name, like a folder's files).
  """
  if src == "pystdlib":
    root = data.pystdlib_root()
    for rel in data.pystdlib_files():
      try:
        text = data._read_utf8(os.path.join(root, rel))
      except DataError:
        continue  # as load_documents: a few stdlib test files are in other encodings
      yield rel, text, HELDOUT if data._hash_fraction(rel) < heldout_fraction else TRAIN
    return
  if not os.path.exists(src):
    raise DataError(f"prepare: source {src!r} does not exist")
  if os.path.isfile(src) and not src.endswith((".jsonl", ".parquet")):
    train, heldout = data.load_documents(f"text:{src}", heldout_fraction)  # one file: its tail is held out
    yield train[0][0], train[0][1], TRAIN
    yield heldout[0][0], heldout[0][1], HELDOUT
    return
  last = _fallback_last(src, heldout_fraction, text_field)
  for i, (name, text) in enumerate(_texts(src, text_field)):
    if last is None:
      yield name, text, HELDOUT if data._hash_fraction(name) < heldout_fraction else TRAIN
    else:  # load_documents' rule when the hash split leaves a split empty: hold out the last document
      yield name, text, (HELDOUT | (TRAIN if last == 0 else 0)) if i == last else TRAIN


def _fallback_last(src, heldout_fraction, text_field):
  """None when the hash split of src's non-empty documents leaves neither split empty (found by reading until a
  document of each split turns up, usually a few); otherwise the number of the last document."""
  seen, n = set(), 0
  for name, _ in _texts(src, text_field):
    seen.add(data._hash_fraction(name) < heldout_fraction)
    n += 1
    if len(seen) == 2:
      return None
  if n == 0:
    raise DataError(f"prepare: {src!r} has no non-empty documents")
  return n - 1


# ---------------------------------------------------------------------------------------------------- tokenizers

def make_tokenizer(spec, src, heldout_fraction, bpe_vocab_size, text_field, out):
  """The tokenizer `--tokenizer` names: bytes, bpe (trained on src's training split, saved in out) or bpe:RUN."""
  saved = os.path.join(out, "tokenizer.json")
  if spec == "bytes":
    return data.ByteTokenizer()
  if spec.startswith("bpe:"):
    path = os.path.join(spec[len("bpe:"):], "data", "tokenizer.json")
    if not os.path.exists(path):
      raise DataError(f"--tokenizer {spec}: {path} does not exist (a run trained with data.tokenizer=bpe has one)")
    tok = data.BPETokenizer.load(path)
  elif spec == "bpe":
    if os.path.exists(saved):  # a resumed prepare keeps the tokenizer it trained
      return data.BPETokenizer.load(saved)
    train = (t for _, t, code in documents(src, heldout_fraction, text_field) if code & TRAIN)
    tok = data.BPETokenizer.train(train, bpe_vocab_size)
  else:
    raise DataError(f"--tokenizer {spec!r}: valid: bytes, bpe, bpe:RUN (a run directory with data/tokenizer.json)")
  tok.save(saved)
  return tok


def _sha256_file(path, chunk=1 << 22):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def tokenizer_info(tokenizer, out):
  """What the manifest records of a tokenizer: its kind, vocabulary and the sha256 of its tokenizer.json."""
  path = os.path.join(out, "tokenizer.json")
  return {"kind": tokenizer.name, "vocab_size": int(tokenizer.vocab_size),
          "sha256": _sha256_file(path) if tokenizer.name == "bpe" else None}


def token_dtype(vocab_size):
  """The smallest unsigned dtype that holds every id of the vocabulary."""
  return next(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32) if vocab_size - 1 <= np.iinfo(t).max)


# ---------------------------------------------------------------------------------------------------- writing

def _write_atomic(path, payload):
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(payload)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class _SplitWriter:
  """Cuts one split's token stream into shards of exactly shard_tokens tokens; resumes after finished shards."""

  def __init__(self, out, split, dtype, shard_tokens, token_nbytes, shards, on_shard):
    self.out, self.split, self.dtype, self.size = out, split, dtype, shard_tokens
    self.token_nbytes, self.shards, self.on_shard = token_nbytes, shards, on_shard
    last = shards[-1] if shards else {"next_doc": 0, "next_offset": 0}
    self.next_doc, self.skip = last["next_doc"], last["next_offset"]  # where the stream resumes
    self.written = sum(s["tokens"] for s in shards)
    self.buf, self.fill, self.index = np.zeros(shard_tokens, dtype), 0, []
    os.makedirs(os.path.join(out, split), exist_ok=True)

  def wants(self, doc):
    return doc >= self.next_doc

  def add(self, doc, tokens, nbytes):
    """Append document number `doc` of this split (its tokens start with <eos>)."""
    i = self.skip if doc == self.next_doc else 0
    if i == 0:
      self.index.append((self.written + self.fill, nbytes))
    while i < len(tokens):
      take = min(self.size - self.fill, len(tokens) - i)
      self.buf[self.fill:self.fill + take] = tokens[i:i + take]
      self.fill, i = self.fill + take, i + take
      if self.fill == self.size:
        self._flush(doc if i < len(tokens) else doc + 1, i if i < len(tokens) else 0)

  def finish(self, n_docs):
    if self.fill:
      self._flush(n_docs, 0)

  def _flush(self, next_doc, next_offset):
    k = len(self.shards)
    name = os.path.join(self.split, f"{k:05d}")
    tokens = self.buf[:self.fill]
    _write_atomic(os.path.join(self.out, name + ".bin"), tokens.tobytes())
    index = np.array(self.index, np.int64).reshape(-1, 2)
    with open(os.path.join(self.out, name + ".idx.npy.tmp"), "wb") as f:
      np.save(f, index)
    os.replace(os.path.join(self.out, name + ".idx.npy.tmp"), os.path.join(self.out, name + ".idx.npy"))
    self.shards.append({
        "file": name + ".bin", "tokens": int(self.fill), "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "index": name + ".idx.npy", "index_sha256": _sha256_file(os.path.join(self.out, name + ".idx.npy")),
        "docs": len(index), "token_bytes": int(self.token_nbytes[tokens].sum()),
        "next_doc": int(next_doc), "next_offset": int(next_offset)})
    self.written += self.fill
    self.fill, self.index, self.skip, self.next_doc = 0, [], 0, next_doc
    self.on_shard()


class _Progress:
  """A one-line progress report on stderr, at most twice a second."""

  def __init__(self, total_bytes, enabled=True):
    self.total, self.done, self.docs, self.t0, self.last = total_bytes, 0, 0, time.perf_counter(), 0.0
    self.enabled = enabled

  def update(self, nbytes, shards, force=False, docs=1):
    self.done, self.docs = self.done + nbytes, self.docs + docs
    now = time.perf_counter()
    if self.enabled and (force or now - self.last > 0.5):
      self.last = now
      rate = self.done / max(now - self.t0, 1e-9) / 1e6
      of = f"{100 * self.done / max(self.total, 1):5.1f}% {self.done / 1e6:.1f}/{self.total / 1e6:.1f}" \
          if self.total is not None else f"{self.done / 1e6:.1f}"
      sys.stderr.write(f"\rprepare: {of} MB, {self.docs} docs, {shards} shards, {rate:.1f} MB/s ")
      sys.stderr.flush()

  def close(self, shards):
    if self.enabled:
      self.update(0, shards, force=True, docs=0)
      sys.stderr.write("\n")


def prepare(src, out, tokenizer="bytes", heldout_fraction=0.02, bpe_vocab_size=4096, shard_tokens=1 << 24,
            text_field="text", progress=True, _stop_after_shards=None):
  """Tokenize src into shards in out (see the module docstring); resumes a killed prepare. Returns the manifest.

  `_stop_after_shards` (tests) raises KeyboardInterrupt once that many shards were written by this call.
  """
  if src != "pystdlib" and not os.path.exists(src):
    raise DataError(f"prepare: source {src!r} does not exist")
  if shard_tokens < 1:
    raise DataError(f"--shard-tokens={shard_tokens}: must be >= 1")
  if not 0 < heldout_fraction < 1:
    raise DataError(f"--heldout-fraction={heldout_fraction}: must be in (0, 1)")
  settings = {"format": FORMAT, "source": src if src == "pystdlib" else os.path.abspath(src),
              "tokenizer_spec": tokenizer, "heldout_fraction": heldout_fraction, "shard_tokens": shard_tokens,
              "text_field": text_field, "bpe_vocab_size": bpe_vocab_size if tokenizer == "bpe" else None}
  if os.path.exists(os.path.join(out, "manifest.json")):  # done before: check it, change nothing
    manifest = verify(out)
    diff = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
    if diff:
      raise DataError(f"{os.path.join(out, 'manifest.json')}: already prepared with other settings ({diff}: then, "
                      "now); use another --out")
    return manifest
  os.makedirs(out, exist_ok=True)
  progress_path = os.path.join(out, "progress.json")
  state = {"settings": settings, "splits": {s: [] for s in SPLITS}}
  if os.path.exists(progress_path):
    with open(progress_path) as f:
      saved = json.load(f)
    if saved["settings"] != settings:
      diff = {k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v}
      raise DataError(f"{progress_path}: an unfinished prepare with other settings ({diff}: then, now); "
                      "rerun it with the same arguments or use another --out")
    state["splits"] = saved["splits"]
  elif os.listdir(out):
    raise DataError(f"--out {out}: not empty and not an unfinished prepare (no progress.json); use a new folder")
  _write_atomic(progress_path, json.dumps(state, indent=1).encode())  # before anything else is written
  tok = make_tokenizer(tokenizer, src, heldout_fraction, bpe_vocab_size, text_field, out)
  dtype = token_dtype(tok.vocab_size)
  state["splits"] = {s: _verified_prefix(out, shards, dtype) for s, shards in state["splits"].items()}
  _remove_unfinished(out, state)
  eos = tok.special["<eos>"]
  written = {"shards": 0}

  def commit():
    _write_atomic(progress_path, json.dumps(state, indent=1).encode())
    written["shards"] += 1
    if _stop_after_shards is not None and written["shards"] >= _stop_after_shards:
      raise KeyboardInterrupt(f"prepare stopped after {written['shards']} shards (test)")

  writers = {code: _SplitWriter(out, split, dtype, shard_tokens, tok.token_nbytes, state["splits"][split], commit)
             for code, split in ((TRAIN, "train"), (HELDOUT, "heldout"))}
  n_shards = lambda: sum(len(s) for s in state["splits"].values())
  bar = _Progress(source_bytes(src), progress)
  counts = {TRAIN: 0, HELDOUT: 0}
  for _, text, code in documents(src, heldout_fraction, text_field):
    nbytes = len(text.encode("utf-8"))
    mine = [c for c in (TRAIN, HELDOUT) if code & c]
    todo = [c for c in mine if writers[c].wants(counts[c])]
    if todo:  # documents inside finished shards are not tokenized again
      tokens = np.concatenate([np.array([eos], np.int32), tok.encode(text)]).astype(dtype)
      for c in todo:
        writers[c].add(counts[c], tokens, nbytes)
    for c in mine:
      counts[c] += 1
    bar.update(nbytes, n_shards())
  for c, w in writers.items():
    w.finish(counts[c])
  bar.close(n_shards())
  splits = {}
  for split, shards in state["splits"].items():
    splits[split] = {"docs": sum(s["docs"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                     "token_bytes": sum(s["token_bytes"] for s in shards),
                     "shards": [{k: s[k] for k in ("file", "tokens", "sha256", "index", "index_sha256", "docs")}
                                for s in shards]}
  manifest = {**settings, "tokenizer": tokenizer_info(tok, out), "dtype": dtype.name, "splits": splits}
  _write_atomic(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=1).encode())
  os.remove(progress_path)
  return manifest


def _verified_prefix(out, shards, dtype):
  """The finished shards of progress.json up to the first whose files are missing, cut short or changed."""
  for i, s in enumerate(shards):
    path, index = os.path.join(out, s["file"]), os.path.join(out, s["index"])
    ok = (os.path.exists(path) and os.path.exists(index) and os.path.getsize(path) == s["tokens"] * dtype.itemsize
          and _sha256_file(path) == s["sha256"] and _sha256_file(index) == s["index_sha256"])
    if not ok:
      return shards[:i]
  return shards


def _remove_unfinished(out, state):
  """Delete shard files that progress.json does not list as finished (a half-written one is redone)."""
  for split in SPLITS:
    keep = {os.path.basename(s[k]) for s in state["splits"][split] for k in ("file", "index")}
    folder = os.path.join(out, split)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
      if name not in keep:
        os.remove(os.path.join(folder, name))


# ---------------------------------------------------------------------------------------------------- reading

class TokenStream:
  """A split's token stream over its memory-mapped shards, indexed like a 1-D int32 array without loading it.

  `windows` (what `data.train_batch` asks for) and indexing copy only the tokens asked for, so only the pages of
  a batch's windows are read; `tokens_read` counts them (tests check the mechanism with it).
  """

  def __init__(self, paths, lengths, shard_tokens, dtype):
    self.shards = [np.memmap(p, dtype, "r", shape=(n,)) for p, n in zip(paths, lengths)]
    self._views = [s.view(np.ndarray) for s in self.shards]  # the same mapped pages, without memmap's overhead
    self.shard_tokens, self.dtype = shard_tokens, np.dtype(np.int32)
    self.shape = (int(sum(lengths)),)
    self.tokens_read = 0

  def __len__(self):
    return self.shape[0]

  def windows(self, starts, length):
    """(len(starts), length) int32: tokens start .. start + length - 1 of each start, copied slice by slice."""
    out = np.empty((len(starts), length), np.int32)
    for row, start in enumerate(np.asarray(starts, np.int64).tolist()):
      if start < 0 or start + length > len(self):
        raise IndexError(f"window {start}..{start + length} out of range for a stream of {len(self)} tokens")
      done = 0
      while done < length:  # a window crossing shard boundaries takes a slice of each
        k, offset = divmod(start + done, self.shard_tokens)
        take = min(length - done, self.shard_tokens - offset)
        out[row, done:done + take] = self._views[k][offset:offset + take]
        done += take
    self.tokens_read += out.size
    return out

  def __getitem__(self, index):
    if isinstance(index, slice):
      start, stop, step = index.indices(len(self))
      if step == 1:
        return self.windows([start], max(stop - start, 0))[0]
      return self[np.arange(start, stop, step)]
    flat = np.asarray(index, np.int64)
    scalar = flat.ndim == 0
    flat = flat.reshape(-1)
    flat = np.where(flat < 0, flat + len(self), flat)
    if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
      raise IndexError(f"token index out of range for a stream of {len(self)} tokens")
    out = np.empty(flat.shape, np.int32)
    shard, offset = np.divmod(flat, self.shard_tokens)
    for k in np.unique(shard):
      sel = shard == k
      out[sel] = self._views[k][offset[sel]]
    self.tokens_read += flat.size
    return out[0] if scalar else out.reshape(np.shape(index))


def read_manifest(folder):
  """The manifest of a prepared folder, checked for the fields and files the reader relies on."""
  path = os.path.join(folder, "manifest.json")
  if not os.path.isdir(folder):
    raise DataError(f"tokens:{folder}: folder {folder!r} does not exist (make it with "
                    "`altbench prepare SRC --out DIR`)")
  if not os.path.exists(path):
    unfinished = os.path.exists(os.path.join(folder, "progress.json"))
    hint = ("prepare did not finish: rerun the same `altbench prepare` to resume" if unfinished
            else "make it with `altbench prepare SRC --out DIR`")
    raise DataError(f"tokens:{folder}: {path} does not exist ({hint})")
  try:
    with open(path) as f:
      manifest = json.load(f)
    dtype = np.dtype(manifest["dtype"])
    size = manifest["shard_tokens"]
    for split in SPLITS:
      entry = manifest["splits"][split]
      shards = entry["shards"]
      if sum(s["tokens"] for s in shards) != entry["tokens"] or any(s["tokens"] != size for s in shards[:-1]):
        raise DataError(f"{path}: the {split} shards' token counts do not add up to {entry['tokens']} "
                        f"in shards of {size}")
    manifest["tokenizer"]["kind"], manifest["heldout_fraction"]
  except (ValueError, KeyError, TypeError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{path}: not a manifest of `altbench prepare` format {FORMAT} ({type(e).__name__}: {e})") from None
  if manifest.get("format") != FORMAT:
    raise DataError(f"{path}: format {manifest.get('format')!r}, this altbench reads format {FORMAT}")
  for split in SPLITS:
    for s in manifest["splits"][split]["shards"]:
      for key in ("file", "index"):
        f = os.path.join(folder, s[key])
        if not os.path.exists(f):
          raise DataError(f"{f}: missing (listed in {path})")
      f, want = os.path.join(folder, s["file"]), s["tokens"] * dtype.itemsize
      if os.path.getsize(f) != want:
        raise DataError(f"{f}: {os.path.getsize(f)} bytes, but {path} lists {s['tokens']} tokens of {dtype.name} "
                        f"= {want} bytes (truncated or overwritten; rerun `altbench prepare` into a fresh --out)")
  return manifest


def verify(folder, manifest=None):
  """Check every file's sha256 against the manifest (reads the whole corpus once, streaming)."""
  manifest = manifest or read_manifest(folder)
  for split in SPLITS:
    for s in manifest["splits"][split]["shards"]:
      for key, digest in (("file", "sha256"), ("index", "index_sha256")):
        path = os.path.join(folder, s[key])
        if _sha256_file(path) != s[digest]:
          raise DataError(f"{path}: sha256 differs from {os.path.join(folder, 'manifest.json')}'s (changed since "
                          "prepare; rerun `altbench prepare` into a fresh --out)")
  return manifest


def _load_tokenizer(folder, manifest, data_cfg, workdir):
  """The manifest's tokenizer; refused when it is not the run's."""
  info, mpath = manifest["tokenizer"], os.path.join(folder, "manifest.json")
  if info["kind"] != data_cfg.tokenizer:
    raise DataError(f"{mpath}: the shards are tokenized with {info['kind']!r}, the run has data.tokenizer="
                    f"{data_cfg.tokenizer!r} (set data.tokenizer={info['kind']} or prepare with --tokenizer "
                    f"{data_cfg.tokenizer})")
  if info["kind"] == "bytes":
    return data.ByteTokenizer()
  path = os.path.join(folder, "tokenizer.json")
  if not os.path.exists(path) or _sha256_file(path) != info["sha256"]:
    raise DataError(f"{path}: {'missing' if not os.path.exists(path) else 'sha256 differs from'} the tokenizer "
                    f"{mpath} records")
  if info["vocab_size"] != data_cfg.bpe_vocab_size:
    raise DataError(f"{mpath}: the shards' BPE tokenizer has {info['vocab_size']} tokens, the run has "
                    f"data.bpe_vocab_size={data_cfg.bpe_vocab_size}")
  own = os.path.join(workdir, "data", "tokenizer.json") if workdir else None
  if own and os.path.exists(own) and _sha256_file(own) != info["sha256"]:
    raise DataError(f"{own}: the run's tokenizer differs from the one the shards in {folder} were made with "
                    f"({mpath})")
  return data.BPETokenizer.load(path)


def _doc_bytes(tokenizer, ids):
  """The UTF-8 bytes a document's tokens (without its <eos>) encode."""
  if tokenizer.name == "bytes":
    return np.asarray(ids, np.uint8).tobytes()
  return tokenizer.tok.decode([int(i) for i in ids], skip_special_tokens=False).encode("utf-8")


def _doc_spans(folder, entry):
  """(start, end, UTF-8 bytes) of each document of a split, reading its shard indexes one at a time."""
  prev = None
  for s in entry["shards"]:
    for start, nbytes in np.load(os.path.join(folder, s["index"])):
      if prev is not None:
        yield prev[0], int(start), prev[1]
      prev = (int(start), int(nbytes))
  if prev is not None:
    yield prev[0], int(entry["tokens"]), prev[1]


def eval_stream(heldout, folder, manifest, tokenizer, eval_bytes):
  """The scored held-out stream `data.load_corpus` builds: whole documents up to eval_bytes bytes, the last one cut
  at a character boundary and tokenized again; reads the held-out shards only as far as it needs."""
  eos, parts, total = tokenizer.special["<eos>"], [], 0
  for start, end, nbytes in _doc_spans(folder, manifest["splits"]["heldout"]):
    if nbytes <= eval_bytes - total:  # a whole document: its tokens as prepared
      parts.append(heldout[start:end])
      total += nbytes
    else:  # as data.eval_text: the document's bytes cut to what is left, then tokenized on its own
      text = _doc_bytes(tokenizer, heldout[start + 1:end])[:eval_bytes - total].decode("utf-8", "ignore")
      parts += [np.array([eos], np.int32), tokenizer.encode(text)]
      total += len(text.encode("utf-8"))
    if total >= eval_bytes:
      break
  return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0,), np.int32)


def load_corpus(data_cfg, workdir=None):
  """A `data.Corpus` over the shards of `tokens:DIR`: training windows by offset into the memmaps."""
  folder = data_cfg.dataset[len("tokens:"):]
  manifest = read_manifest(folder)
  if abs(manifest["heldout_fraction"] - data_cfg.heldout_fraction) > 1e-12:
    raise DataError(f"{os.path.join(folder, 'manifest.json')}: prepared with --heldout-fraction "
                    f"{manifest['heldout_fraction']}, the run has data.heldout_fraction={data_cfg.heldout_fraction}")
  tokenizer = _load_tokenizer(folder, manifest, data_cfg, workdir)
  dtype, size = np.dtype(manifest["dtype"]), manifest["shard_tokens"]

  def stream(split):
    shards = manifest["splits"][split]["shards"]
    return TokenStream([os.path.join(folder, s["file"]) for s in shards], [s["tokens"] for s in shards], size, dtype)

  train, heldout = stream("train"), stream("heldout")
  evals = eval_stream(heldout, folder, manifest, tokenizer, data_cfg.eval_bytes)
  eval_bytes = int(tokenizer.token_nbytes[evals].sum())
  t = manifest["splits"]["train"]
  stats = {"train_docs": t["docs"], "heldout_docs": manifest["splits"]["heldout"]["docs"],
           "train_tokens": t["tokens"], "eval_tokens": int(len(evals)), "eval_bytes": eval_bytes,
           "vocab_size": tokenizer.vocab_size, "train_bytes_per_token": float(t["token_bytes"] / max(t["tokens"], 1)),
           "pad_fraction_train": 0.0}
  return data.Corpus(tokenizer, train, evals, eval_bytes, stats)
