"""Data loading: training tokens/s served and peak host memory, `tokens:DIR` shards against the in-memory path.

The corpus is pystdlib repeated k times (a folder of k copies of the standard library's .py files, symlinked, each
copy under its own name so the hash split differs), k in --scales. For each k it runs `altbench prepare` (bytes
tokenizer) once, then, each in a fresh subprocess, loads the corpus as `text:FOLDER` (in memory) and as
`tokens:DIR` (memory-mapped) and serves --batches training batches of --batch x --seq-len, the loop's
`corpus.train_batch`. One JSON line per (k, path): load seconds, tokens/s served, peak RSS (ru_maxrss) and, at
the end, resident memory split into anonymous (the process's own: what grows with an in-memory corpus) and file
pages (the memmaps' pages the windows touched, with the kernel's fault-around: page cache, reclaimable); then one
line per k with tokens/s ratio = tokens / memory and both paths' peak and anonymous RSS. Both paths serve the same
batches (checked on the first one).

  altbench bench data_throughput [--scales 1,2,5,10] [--batches 200] [--out FILE]
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def make_corpus(folder, copies):
  """k copies of the stdlib's UTF-8 .py files as symlinks (no disk), under copyI/ each."""
  from altbench.train import data
  root = data.pystdlib_root()
  files = []
  for rel in data.pystdlib_files():
    try:
      data._read_utf8(os.path.join(root, rel))
      files.append(rel)
    except data.DataError:
      continue  # as pystdlib: the few test files in other encodings are left out
  for i in range(copies):
    for rel in files:
      dst = os.path.join(folder, f"copy{i}", rel)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      os.symlink(os.path.join(root, rel), dst)


def _rss_now():
  """Resident memory now, split (Linux): anonymous (the process's own) and file pages (memmaps, reclaimable)."""
  try:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
  except OSError:
    return {}
  return {f"rss_{k[3:].lower()}_mb": round(int(status[k].split()[0]) / 1024, 1) for k in ("RssAnon", "RssFile")
          if k in status}


def serve(dataset, batches, batch_size, seq_len):
  """In this process: load the corpus, serve batches; a JSON dict of times, tokens/s and peak RSS."""
  import hashlib

  from altbench.train import data
  from altbench.train.config import DataConfig
  t0 = time.perf_counter()
  corpus = data.load_corpus(DataConfig(dataset=dataset, seq_len=seq_len))
  load_s = time.perf_counter() - t0
  first = corpus.train_batch(0, 0, batch_size, seq_len)
  t0 = time.perf_counter()
  for step in range(1, batches + 1):
    corpus.train_batch(0, step, batch_size, seq_len)
  serve_s = time.perf_counter() - t0
  return {"load_s": round(load_s, 3), "tokens_per_s": round(batches * batch_size * seq_len / serve_s),
          "corpus_tokens": int(corpus.stats["train_tokens"]),
          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **_rss_now(),
          "first_batch_sha256": hashlib.sha256(first["inputs"].tobytes()).hexdigest()[:16]}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--scales", default="1,2,5,10", help="corpus sizes in copies of pystdlib")
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--shard-tokens", type=int, default=1 << 24)
  p.add_argument("--workdir", default=None, help="where corpora and shards go (default: a temporary folder)")
  p.add_argument("--out", default=None, help="also append the JSON lines to this file")
  p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # internal: one subprocess measurement
  args = p.parse_args()
  if args.serve:
    print(json.dumps(serve(args.serve, args.batches, args.batch, args.seq_len)))
    return
  from altbench.train import shards
  work = args.workdir or tempfile.mkdtemp(prefix="data_throughput_")
  out = open(args.out, "a") if args.out else None

  def emit(row):
    line = json.dumps(row)
    print(line, flush=True)
    if out:
      out.write(line + "\n")
      out.flush()

  env = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
         "cpus": os.cpu_count(), "python": platform.python_version()}
  try:
    for k in (int(x) for x in args.scales.split(",")):
      src, dst = os.path.join(work, f"src{k}"), os.path.join(work, f"shards{k}")
      if not os.path.isdir(src):
        make_corpus(src, k)
      t0 = time.perf_counter()
      m = shards.prepare(src, dst, shard_tokens=args.shard_tokens, progress=False)
      prepare_s = time.perf_counter() - t0
      rows = {}
      for path, dataset in (("memory", f"text:{src}"), ("tokens", f"tokens:{dst}")):
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", dataset, "--batches", str(args.batches),
               "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[path] = json.loads(res.stdout.strip().splitlines()[-1])
        emit({"bench": "data_throughput", "scale": k, "path": path, "batch": args.batch, "seq_len": args.seq_len,
              **rows[path], **({"prepare_s": round(prepare_s, 2), "shards": len(m["splits"]["train"]["shards"])}
                               if path == "tokens" else {}), **env})
      same = rows["memory"]["first_batch_sha256"] == rows["tokens"]["first_batch_sha256"]
      emit({"bench": "data_throughput", "scale": k, "corpus_tokens": rows["tokens"]["corpus_tokens"],
            "ratio": round(rows["tokens"]["tokens_per_s"] / rows["memory"]["tokens_per_s"], 3),
            "peak_rss_mb_memory": rows["memory"]["peak_rss_mb"], "peak_rss_mb_tokens": rows["tokens"]["peak_rss_mb"],
            "rss_anon_mb_memory": rows["memory"].get("rss_anon_mb"),
            "rss_anon_mb_tokens": rows["tokens"].get("rss_anon_mb"),
            "same_batches": same})
  finally:
    if out:
      out.close()
    if not args.workdir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
