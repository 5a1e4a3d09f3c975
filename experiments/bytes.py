"""Byte-level models against the byte and BPE transformers at equal training FLOPs on pystdlib (bits per byte).

Variants, each also with a "-smoke" suffix (a few CPU minutes) and a "-cpu" suffix (the cpu arena's widths and
windows, experiments/arena.py, at 8x its budget: 2400 byte-transformer steps, 5-10 CPU minutes per variant):
  byte-transformer    family lm, "AAAA" on bytes (the baseline whose FLOPs set the budget)
  byte-mamba          family lm, pure Mamba-2 on bytes, parameters matched to the transformer (experiments/mamba.py)
  megabyte-4, -8      MegaByte with fixed patches of 4 and 8 bytes: global "AAAA", local "AA"
  space               BLT with SpaceByte-style space patching, hash n-gram embeddings
  blt-entropy         BLT with entropy patching and hash n-grams
  blt-entropy-nohash  the same without hash n-gram embeddings
  blt-entropy-matched entropy patching matched to `space` (min_mean_patch 4: the same global slots; threshold for
                      a mean of MATCHED_MEAN_PATCH bytes, space's length) with the half-width entropy model
                      `entropy-lm-small`, whose forward costs 7% of the step instead of 27%
  bpe-transformer     family lm, "AAAA" on a 4096-token BPE, windows of seq_len / 4 tokens (about the same bytes)
  entropy-lm, entropy-lm-small
                      the small byte lm the entropy patcher reads (-small: half its width, for -matched); train
                      it first (not in the budget):
                        altbench train experiments/bytes.py:entropy-lm        (-> runs/bytes-entropy-lm)
                        altbench train experiments/bytes.py:blt-entropy
                      blt-entropy takes model.patcher_run = runs/bytes-entropy-lm[-SCALE] (relative to the working
                      directory) and calibrates the entropy threshold there for a mean patch of ENTROPY_MEAN_PATCH
                      bytes (cached in that run directory). Without that run it warns and uses space patching.
"" is blt-entropy. Every variant gets the byte transformer's FLOPs budget: steps = budget / (FLOPs per step),
where FLOPs are each family's analytic training FLOPs (BLT's include the frozen entropy model's forward).
"""

import dataclasses
import json
import os
import warnings

from altbench import archs
from altbench.archs import blt, lm, megabyte
from altbench.train.config import Config, DataConfig, TrainConfig, check_variant, load_module

mamba = load_module(os.path.join(os.path.dirname(__file__), "mamba.py"))

ARCHS = ("byte-transformer", "byte-mamba", "megabyte-4", "megabyte-8", "space", "blt-entropy", "blt-entropy-nohash",
         "blt-entropy-matched", "bpe-transformer", "entropy-lm", "entropy-lm-small")
SCALES = ("", "cpu", "smoke")
VARIANTS = ("", "smoke") + tuple(f"{a}-{s}" if s else a for a in ARCHS for s in SCALES)
ENTROPY_MEAN_PATCH = 4.5  # BLT's entropy models average about 4.5 bytes per patch
MATCHED_MEAN_PATCH = 7.3  # space patching's mean on pystdlib windows of 128 bytes (7.1-7.3 held out)
MAX_PATCH = 16


def sizes(scale):
  return {"smoke": dict(d=128, heads=4, layers=3, local=64, local_heads=2, seq_len=128, batch=16, baseline_steps=400,
                        buckets=1024, eval_bytes=32768),
          "cpu": dict(d=128, heads=4, layers=3, local=64, local_heads=2, seq_len=128, batch=16, baseline_steps=2400,
                      buckets=2048, eval_bytes=32768),
          "": dict(d=256, heads=4, layers=4, local=128, local_heads=4, seq_len=512, batch=16, baseline_steps=4000,
                   buckets=4096, eval_bytes=131072)}[scale]


def entropy_lm_config(scale, small=False):
  d = (64 if scale == "smoke" else 128) // (2 if small else 1)
  return lm.Config(pattern="AA", d_model=d, n_heads=max(d // 32, 1))


def calibrated_threshold(run_dir, seq_len, target=ENTROPY_MEAN_PATCH, max_len=MAX_PATCH, n_windows=64):
  """The entropy threshold for a target mean patch length on pystdlib training windows, cached in run_dir."""
  import numpy as np

  from altbench.archs import patching
  from altbench.train import data, loop
  cache = os.path.join(run_dir, f"entropy_threshold_{target}_{max_len}_{seq_len}.json")
  ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
  if os.path.exists(cache) and json.load(open(cache)).get("checkpoints") == ckpts:
    return json.load(open(cache))["threshold"]
  train_docs, _ = data.load_documents("pystdlib", DataConfig().heldout_fraction)
  tok = data.ByteTokenizer()
  stream = data.token_stream(tok, [t for _, t in train_docs[::50]])
  starts = np.random.default_rng(0).integers(0, len(stream) - seq_len, n_windows)
  windows = stream[starts[:, None] + np.arange(seq_len)]
  theta = patching.calibrate_threshold(patching.EntropyModel(loop.load_model(run_dir)[1]), windows, target,
                                       max_len=max_len)
  with open(cache, "w") as f:
    json.dump({"threshold": theta, "target_mean_patch": target, "checkpoints": ckpts}, f)
  return theta


def model_config(arch, scale):
  s = sizes(scale)
  d, heads, layers = s["d"], s["heads"], s["layers"]
  transformer = lm.Config(pattern="A" * layers, d_model=d, n_heads=heads)
  if arch in ("byte-transformer", "bpe-transformer"):
    return "lm", transformer
  if arch.startswith("entropy-lm"):
    return "lm", entropy_lm_config(scale, small=arch.endswith("small"))
  if arch == "byte-mamba":
    ssm = dict(d_state=32, ssm_headdim=32, chunk_size=32) if scale else {}
    return "lm", mamba.model_config("mamba2", d_model=d, n_heads=heads, n_layers=layers, **ssm)
  parts = dict(pattern="A" * layers, d_model=d, n_heads=heads, d_local=s["local"], local_heads=s["local_heads"])
  if arch.startswith("megabyte"):
    return "megabyte", megabyte.Config(**parts, local_pattern="AA", patch_size=int(arch.split("-")[1]))
  cfg = blt.Config(**parts, encoder_pattern="A", decoder_pattern="AA", max_patch_len=MAX_PATCH,
                   hash_buckets=0 if arch.endswith("nohash") else s["buckets"])
  if arch == "space":
    return "blt", dataclasses.replace(cfg, patcher="space", min_mean_patch=4)
  matched = arch == "blt-entropy-matched"
  lm_name = "entropy-lm-small" if matched else "entropy-lm"
  run_dir = os.path.join("runs", f"bytes-{lm_name}" + (f"-{scale}" if scale else ""))
  if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
    warnings.warn(f"{arch}: no entropy model at {run_dir} (train experiments/bytes.py:{lm_name}"
                  f"{f'-{scale}' if scale else ''} first); this run falls back to space patching")
    return "blt", dataclasses.replace(cfg, patcher="entropy", min_mean_patch=4)
  target = MATCHED_MEAN_PATCH if matched else ENTROPY_MEAN_PATCH
  return "blt", dataclasses.replace(cfg, patcher="entropy", patcher_run=run_dir, min_mean_patch=4 if matched else 3,
                                    entropy_threshold=calibrated_threshold(run_dir, s["seq_len"], target=target))


def get_config(variant=""):
  check_variant(variant, VARIANTS)
  scale = next((s for s in ("cpu", "smoke") if variant.endswith(s)), "")
  arch = variant.removesuffix(scale).removesuffix("-") or "blt-entropy"
  s = sizes(scale)
  family, model = model_config(arch, scale)
  bpe = arch == "bpe-transformer"
  seq_len = s["seq_len"] // 4 if bpe else s["seq_len"]
  data = DataConfig(dataset="pystdlib", tokenizer="bpe" if bpe else "bytes", seq_len=seq_len,
                    eval_bytes=s["eval_bytes"])

  def per_step(fam, cfg, length, vocab):
    return archs.get_family(fam).flops_per_token(dataclasses.replace(cfg, vocab_size=vocab), length) * length * s["batch"]

  _, baseline = model_config("byte-transformer", scale)
  budget = per_step("lm", baseline, s["seq_len"], 262) * s["baseline_steps"]  # the byte transformer's
  steps = max(1, round(budget / per_step(family, model, seq_len, data.bpe_vocab_size if bpe else 262)))
  if arch.startswith("entropy-lm"):
    steps = s["baseline_steps"] // 2
  train = TrainConfig(steps=steps, batch_size=s["batch"], lr=2e-3, warmup_steps=min(200, steps // 10),
                      eval_every=-(-steps // 4), ckpt_every=-(-steps // 4), sample_len=200 if scale == "" else 64)
  return Config(family=family, model=model, data=data, train=train)
