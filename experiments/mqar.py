"""Zoology's MQAR calibration: attention, Mamba-2 (state 16 and 64), Gated DeltaNet and a hybrid, accuracy vs
d_model with one panel per sequence length, beside the numbers Zoology published.

The protocol, as read from the paper (Arora et al. 2023, "Zoology", arXiv 2312.04927, figure 2) and its
repository (HazyResearch/zoology at d88d6f5):
  data       `zoology/data/multiquery_ar.py` (ours: `train/tasks.py` `mqar-zoology`): vocabulary 8192, keys from
             1..4095 and values from 4096..8191 (distinct within an example), the kv pairs first, then each key
             queried once at a slot chosen by a power law (power_a = 0.01, favouring short gaps), filler 0
             elsewhere (`random_non_queries=False`); only the query positions carry loss and accuracy.
  shapes     `zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py`: (seq_len, kv pairs) = (64, 4),
             (128, 8), (256, 16) [and (512, 64), commented out there]; batch 512 (256 at seq_len 256); 100,000
             training and 3,000 test examples (a fixed set, reused every epoch).
  model      2 layers, state mixer `torch.nn.Identity` (no MLP), attention with 1 head (dropout 0.1) and learned
             position embeddings, embeddings tied to the output head (`zoology/model.py`); d_model in
             {64, 128, 256, 512}.
  training   `zoology/train.py`, `zoology/config.py`: AdamW (torch defaults b1 0.9, b2 0.999), weight decay 0.1,
             lr in logspace(-4, -2, 4) = {1e-4, 4.6e-4, 2.2e-3, 1e-2}, cosine annealing to 0 over 64 epochs (no
             warmup, no gradient clipping), eval after every epoch, early stop once valid accuracy > 0.99.
  reported   the best validation accuracy over the four learning rates per (mixer, d_model, seq_len)
             (`iclr24_zoology_figure2/README.md`, `zoology/analysis/paper/zoology_paper/zoology_figure2.py`).
  published  figure 2 (`assets/figure2.png` in the repository; PUBLISHED below, read off the plot, about
             +-0.03): attention ~0.97-1.0 at every width and length; the gated convolutions (Hyena, RWKV, H3,
             BaseConv) fall with sequence length and recover with width. Mamba is not in Zoology's figure 2 (the
             Based paper's figure 2, `arxiv24_based_figure2/`, plots it against state size); the Mamba-2 paper
             (Dao and Gu 2024) has an MQAR figure with Mamba-2 at state sizes 16/64/256, whose setting and
             points were not checked here (*unverified*), so no Mamba-2 number is printed as published.

Ours, where it differs by construction: RoPE instead of learned position embeddings, no dropout, fresh examples
per (seed, step) instead of a fixed 100,000-example set reused for 64 epochs (every run here sees fewer than
100,000 examples, so no example repeats either way), the cosine decays per step instead of per epoch.
Mamba-2 ("MM") is our Mamba-2 block without MLP at d_state 16 and 64 (head dim 64, expand 2, conv 4), Gated
DeltaNet ("GG") one head, the hybrid "MA" a Mamba-2 layer (d_state 16) then attention.

Grids (`--grid`):
  full   the protocol: vocabulary 8192, the three shapes, d_model 64..512, the four learning rates, the
         protocol's batch and 64 epochs of 100,000 examples, 3,000 eval examples after every epoch. GPU-sized.
  cpu    what fits ~35 minutes of a shared 2-core CPU (see CPU below): the protocol's generator, model shapes,
         optimizer and selection rule, scaled in the budget (2,048 tokens per step: batch 32 at seq_len 64, 8 at
         256; at most 1,000 steps, eval every 100 on 500 examples; one learning rate, the sweep's largest 1e-2;
         one seed; (d_model, seq_len) cells (64, 64), (64, 256), (128, 256), (128, 64) in that order, the
         last dropped when the deadline passes) and in ONE size axis, the vocabulary (512
         instead of 8192: the lm family computes every position's logits, and the 8192-way head is ~95% of a
         d_model-64 step, 1-2 s per 64 x 64-token batch on this shared CPU; at 512 a 32 x 64 step takes ~0.1 s).

Variants: "ARCH-dD-sL" (ARCH in ARCHS, D in WIDTHS, L in SHAPES) with the protocol's budget, and the same with
"-cpu" for the CPU grid's ("-cpu3x": three times its steps, to see whether a run that stalls is short of budget);
"" is attention-d64-s64. The learning rate is set per run (`--set train.lr=`).

  altbench train experiments/mqar.py:attention-d64-s64-cpu --workdir runs/mqar --set train.lr=0.01
  python experiments/mqar.py --run runs/mqar [--grid cpu|full]   every run of the grid, early stopped, rows
                                                                  appended to experiments/results/mqar_<grid>.jsonl
  python experiments/mqar.py --report [--grid cpu]                the .md table and .png figure from that JSONL
"""

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np

from altbench import archs
from altbench.archs import lm
from altbench.train.config import Config, DataConfig, TrainConfig, check_variant

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# The protocol (sources in the docstring)
VOCAB = 8192
SHAPES = {64: 4, 128: 8, 256: 16}  # seq_len: kv pairs
BATCH = {64: 512, 128: 512, 256: 256}
WIDTHS = (64, 128, 256, 512)
LRS = tuple(float(x) for x in np.logspace(-4, -2, 4))
EPOCHS, TRAIN_EXAMPLES, TEST_EXAMPLES = 64, 100_000, 3_000
EARLY_STOP = 0.99  # stop once eval accuracy exceeds this (zoology/config.py early_stopping_threshold)

ARCHS = {  # name: (pattern, model fields beside the shared ones)
    "attention": ("AA", {}),
    "mamba2-n16": ("MM", {"d_state": 16}),
    "mamba2-n64": ("MM", {"d_state": 64}),
    "gdn": ("GG", {}),
    "mamba2-attention": ("MA", {"d_state": 16}),
}

# The CPU grid: everything not named here is the protocol's
CPU = {"vocab": 512, "cells": ((64, 64), (64, 256), (128, 256), (128, 64)), "lrs": (LRS[-1],), "seeds": (0,),
       "archs": ("mamba2-n16", "gdn", "mamba2-n64", "mamba2-attention", "attention"),
       "tokens_per_step": 2048, "steps": 1000, "eval_every": 100, "eval_examples": 500}

# Zoology figure 2 (assets/figure2.png), read off the plot (about +-0.03): mixer -> seq_len -> accuracy at
# d_model 64, 128, 256, 512
PUBLISHED = {
    "attention": {64: (0.97, 0.97, 0.97, 0.97), 128: (0.98, 0.98, 0.98, 0.98), 256: (0.98, 0.98, 0.98, 0.98)},
    "hyena": {64: (0.51, 0.74, 0.83, 0.85), 128: (0.21, 0.62, 0.73, 0.83), 256: (0.06, 0.14, 0.53, 0.68)},
    "rwkv": {64: (0.74, 0.92, 0.95, 0.97), 128: (0.18, 0.49, 0.74, 0.90), 256: (0.06, 0.07, 0.66, 0.78)},
    "h3": {64: (0.90, 0.97, 0.97, 0.96), 128: (0.25, 0.72, 0.89, 0.75), 256: (0.07, 0.63, 0.61, 0.66)},
    "baseconv": {64: (0.69, 0.92, 0.94, 0.97), 128: (0.37, 0.61, 0.83, 0.93), 256: (0.15, 0.34, 0.80, 0.91)},
}

SUFFIXES = ("", "-cpu", "-cpu3x")  # the protocol's budget, the CPU grid's, three times the CPU grid's steps
VARIANTS = ("",) + tuple(f"{a}-d{d}-s{s}{suffix}" for a in ARCHS for d in WIDTHS for s in SHAPES
                         for suffix in SUFFIXES)


def model_config(arch, d_model):
  """Two mixer layers, no MLP, tied embeddings, one attention head; vocab_size from the corpus."""
  pattern, fields = ARCHS[arch]
  return lm.Config(pattern=pattern, d_model=d_model, n_heads=1, mlp=False, tie_embeddings=True, vocab_size=0,
                   chunk_size=64, **fields)


def get_config(variant=""):
  check_variant(variant, VARIANTS)
  suffix = budget(variant)
  cpu = suffix.startswith("-cpu")
  arch, d, s = (variant.removesuffix(suffix) or "attention-d64-s64").rsplit("-", 2)
  d_model, seq_len = int(d[1:]), int(s[1:])
  # AdamW as torch's defaults, no warmup, cosine to 0, no clipping; lr: the sweep's largest unless --set
  train = dict(lr=LRS[-1], warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.1, b1=0.9, b2=0.999, grad_clip=0.0,
               log_every=10, ckpt_every=0, samples=0)
  if cpu:
    batch = CPU["tokens_per_step"] // seq_len
    train.update(steps=CPU["steps"] * (3 if suffix == "-cpu3x" else 1), batch_size=batch,
                 eval_every=CPU["eval_every"])
    data = DataConfig(dataset="mqar-zoology", task_size=CPU["vocab"], seq_len=seq_len, task_pairs=SHAPES[seq_len],
                      eval_examples=CPU["eval_examples"])
  else:
    per_epoch = TRAIN_EXAMPLES // BATCH[seq_len]
    train.update(steps=EPOCHS * per_epoch, batch_size=BATCH[seq_len], eval_every=per_epoch)
    data = DataConfig(dataset="mqar-zoology", task_size=VOCAB, seq_len=seq_len, task_pairs=SHAPES[seq_len],
                      eval_examples=TEST_EXAMPLES)
  return Config(family="lm", model=model_config(arch, d_model), data=data, train=TrainConfig(**train))


def budget(variant):
  """The variant's budget suffix: "", "-cpu" or "-cpu3x"."""
  return next((x for x in SUFFIXES[:0:-1] if variant.endswith(x)), "")


def grid(name):
  """(variant, lr, seed) of every run, the first learning rate for every cell before the next; the CPU grid's
  (d_model, seq_len) cells in the order that tests the trend soonest: the fall with length at d_model 64, then
  the recovery with width at seq_len 256."""
  if name == "cpu":
    g = CPU
    cells = [(a, d, s) for d, s in g["cells"] for a in g["archs"]]
    return [(f"{a}-d{d}-s{s}-cpu", lr, seed) for lr in g["lrs"] for seed in g["seeds"] for a, d, s in cells]
  cells = [(a, d, s) for s in SHAPES for d in WIDTHS for a in ARCHS]
  return [(f"{a}-d{d}-s{s}", lr, 0) for lr in LRS[::-1] for a, d, s in cells]


def _evals(run_dir):
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in (json.loads(line) for line in f if line.strip()) if "eval_acc" in r]


def train_one(variant, lr, seed, run_dir, log):
  """Train one run in a subprocess; SIGINT it (the loop saves and stops) once an eval passes EARLY_STOP."""
  exe = os.path.join(os.path.dirname(sys.executable), "altbench")
  cmd = [exe, "train", f"{os.path.abspath(__file__)}:{variant}", "--workdir", run_dir, "--set", f"train.lr={lr}",
         "--set", f"train.seed={seed}"]
  os.makedirs(run_dir, exist_ok=True)
  t0 = time.time()
  early = False
  with open(os.path.join(run_dir, "stdout.txt"), "a") as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    while proc.poll() is None:
      time.sleep(0.5)
      if not early and any(r["eval_acc"] > EARLY_STOP for r in _evals(run_dir)):
        early = True
        proc.send_signal(signal.SIGINT)
    rc = proc.returncode
  evals = _evals(run_dir)
  if not evals:
    raise RuntimeError(f"{variant} lr={lr}: no eval in {run_dir} (exit {rc}); see {run_dir}/stdout.txt")
  best = max(evals, key=lambda r: r["eval_acc"])
  cfg = get_config(variant)
  arch = variant.rsplit("-d", 1)[0]
  pattern = ARCHS[arch][0]
  row = {"arch": arch, "pattern": pattern, "d_model": cfg.model.d_model,
         "d_state": cfg.model.d_state if "M" in pattern else None, "seq_len": cfg.data.seq_len,
         "pairs": cfg.data.task_pairs, "vocab": cfg.data.task_size, "lr": lr, "seed": seed,
         "batch": cfg.train.batch_size, "steps": cfg.train.steps, "steps_run": evals[-1]["step"],
         "eval_examples": cfg.data.eval_examples, "eval_every": cfg.train.eval_every,
         "params": archs.param_count("lm", dataclasses.replace(cfg.model, vocab_size=cfg.data.task_size)),
         "eval_acc": best["eval_acc"], "best_step": best["step"], "last_eval_acc": evals[-1]["eval_acc"],
         "early_stopped": early, "exit": rc, "wall_s": round(time.time() - t0, 1),
         "machine": f"{platform.machine()} {os.cpu_count()} cpus {platform.node()}", "variant": variant}
  log(f"{variant} lr={lr:.2e}: best eval_acc {row['eval_acc']:.4f} at step {row['best_step']} "
      f"({'early stop' if early else 'full budget'}, {row['wall_s']:.0f} s)")
  return row


def run(out_dir, grid_name, jsonl, deadline=None, log=print, only=()):
  """Every run of the grid (or of the variants `only`, at the grid's learning rates and seeds) not already in
  jsonl; a cell's other learning rates are skipped once one passes EARLY_STOP (the best over the sweep is then
  already > 0.99)."""
  done = []
  if os.path.exists(jsonl):
    with open(jsonl) as f:
      done = [json.loads(line) for line in f if line.strip()]
  runs = grid(grid_name)
  if only:
    runs = [(v, lr, seed) for v in only for lr, seed in dict.fromkeys((lr, seed) for _, lr, seed in runs)]
  for variant, lr, seed in runs:
    if deadline and time.time() > deadline:
      log(f"deadline passed: stopping before {variant} lr={lr}")
      break
    if any(r["variant"] == variant and r["seed"] == seed and (r["lr"] == lr or r["eval_acc"] > EARLY_STOP)
           for r in done):
      continue
    row = train_one(variant, lr, seed, os.path.join(out_dir, f"{variant}-lr{lr:.2e}-seed{seed}"), log)
    done.append(row)
    with open(jsonl, "a") as f:
      f.write(json.dumps(row) + "\n")


def best_per_cell(rows):
  """(arch, seq_len, d_model) -> the row with the best eval accuracy over learning rates (and seeds)."""
  best = {}
  for r in rows:
    key = (r["arch"], r["seq_len"], r["d_model"])
    if key not in best or r["eval_acc"] > best[key]["eval_acc"]:
      best[key] = r
  return best


def table(rows, grid_name):
  """The markdown report: ours (best over the learning rates run) beside Zoology's figure 2; runs at another
  budget than the grid's (-cpu3x) in a section of their own."""
  suffix = "-cpu" if grid_name == "cpu" else ""
  others = [r for r in rows if budget(r["variant"]) != suffix]
  rows = [r for r in rows if budget(r["variant"]) == suffix]
  best = best_per_cell(rows)
  seq_lens = sorted({k[1] for k in best})
  widths = sorted({k[2] for k in best})
  archs_run = list(dict.fromkeys(r["arch"] for r in rows))
  r0 = rows[0]
  scale = (f"vocabulary {r0['vocab']} (protocol 8192), {r0['batch'] * r0['seq_len']} tokens per step "
           f"(protocol 512 x 64 / 512 x 128 / 256 x 256), at most {r0['steps']} steps with eval every "
           f"{r0['eval_every']} on {r0['eval_examples']} examples (protocol: 64 epochs of 100,000 examples, eval each "
           f"epoch on 3,000), learning rates {sorted({r['lr'] for r in rows})} (protocol: logspace(-4, -2, 4)), "
           f"seeds {sorted({r['seed'] for r in rows})}")
  lines = [f"# MQAR against Zoology's figure 2 ({grid_name} grid)", "",
           "Generated by `python experiments/mqar.py --report"
           + (f" --grid {grid_name}" if grid_name != "cpu" else "") + f"` from `mqar_{grid_name}.jsonl` "
           "(one row per run); the protocol and its sources are in `experiments/mqar.py`'s docstring.", "",
           f"**Scale.** Ours is scaled down from the protocol: {scale}; seq_len {seq_lens}, d_model {widths}. "
           "Zoology's numbers are full-protocol runs read off its figure 2 (`assets/figure2.png`, about +-0.03). "
           "Ours: the best eval accuracy over the evals of a run and over the learning rates run (Zoology: best "
           "over four learning rates, runs early stopped at > 0.99). Runs stopped early at > 0.99 are marked *.", ""]
  header = "| model | source | " + " | ".join(f"d={d}" for d in widths) + " |"
  for s in seq_lens:
    lines += [f"## seq_len {s}, {SHAPES[s]} kv pairs", "", header, "|---|---|" + "---|" * len(widths)]
    for a in archs_run:
      cells = []
      for d in widths:
        r = best.get((a, s, d))
        cells.append("" if r is None else f"{r['eval_acc']:.3f}" + ("*" if r["early_stopped"] else ""))
      pattern = next(r["pattern"] for r in rows if r["arch"] == a)
      lines.append(f"| {a} `{pattern}` | ours | " + " | ".join(cells) + " |")
    for m, by_len in PUBLISHED.items():
      if s in by_len:
        vals = dict(zip(WIDTHS, by_len[s]))
        lines.append(f"| {m} | Zoology fig. 2 | " + " | ".join(f"~{vals[d]:.2f}" for d in widths) + " |")
    lines.append("")
  lines += ["Mamba-2, Gated DeltaNet and the hybrid have no published point in this protocol (Zoology's figure 2 has "
            "none; the Mamba-2 paper's MQAR figure was not checked here, *unverified*), so their rows stand "
            "against the published trend, not a number.", ""]
  lines += ["## The published trend, inside what ran", ""] + trend(best) + [""]
  if others:
    lines += ["## Longer budgets", "", "The same configs with more steps (the variant's suffix), to tell a stall "
              "short of budget from one that stays:", "",
              "| model | seq_len | d_model | lr | steps | steps run | best step | eval acc | early stop | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in others:
      lines.append(f"| {r['arch']} | {r['seq_len']} | {r['d_model']} | {r['lr']:.2e} | {r['steps']} | "
                   f"{r['steps_run']} | {r['best_step']} | {r['eval_acc']:.4f} | {r['early_stopped']} | "
                   f"{r['wall_s']:.0f} |")
    lines.append("")
  lines += ["## Runs", "", "| model | seq_len | d_model | lr | steps run | best step | eval acc | wall s | params |",
            "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['arch']} | {r['seq_len']} | {r['d_model']} | {r['lr']:.2e} | {r['steps_run']} | "
                 f"{r['best_step']} | {r['eval_acc']:.4f} | {r['wall_s']:.0f} | {r['params'] / 1e3:.0f}K |")
  lines += ["", f"Machine: {r0['machine']}; total wall {sum(r['wall_s'] for r in rows + others) / 60:.1f} min."]
  return "\n".join(lines) + "\n"


def trend(best):
  """Zoology's trend as sentences from the best-per-cell accuracies: attention high everywhere; recurrent models
  fall with sequence length (at the smallest width run at two lengths) and recover with width (at the longest
  length run at two widths) or with state size (mamba2-n16 against mamba2-n64)."""
  out = []
  seq_lens, widths = sorted({k[1] for k in best}), sorted({k[2] for k in best})
  archs_run = list(dict.fromkeys(k[0] for k in best))
  fmt = lambda a, s, d: f"{best[(a, s, d)]['eval_acc']:.3f}" if (a, s, d) in best else "-"
  for a in archs_run:
    parts = []
    if len(seq_lens) > 1:
      d = widths[0]
      parts.append(f"d_model {d}: seq_len " + " / ".join(str(s) for s in seq_lens) + " -> "
                   + " / ".join(fmt(a, s, d) for s in seq_lens))
    if len(widths) > 1:
      s = seq_lens[-1]
      parts.append(f"seq_len {s}: d_model " + " / ".join(str(d) for d in widths) + " -> "
                   + " / ".join(fmt(a, s, d) for d in widths))
    out.append(f"- {a}: " + ("; ".join(parts) or "one cell run"))
  for s in seq_lens:
    for d in widths:
      if ("mamba2-n16", s, d) in best and ("mamba2-n64", s, d) in best:
        out.append(f"- state size at seq_len {s}, d_model {d}: mamba2 d_state 16 -> 64: {fmt('mamba2-n16', s, d)} -> "
                   f"{fmt('mamba2-n64', s, d)}")
  return out


def figure(rows, path):
  """Accuracy vs d_model, one panel per seq_len: ours solid, Zoology's attention and gated convolutions dashed."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no figure written")
    return False
  best = best_per_cell(rows)
  seq_lens = sorted({k[1] for k in best})
  fig, axes = plt.subplots(1, len(seq_lens), figsize=(3.2 * len(seq_lens) + 1.8, 3), sharey=True, squeeze=False)
  for ax, s in zip(axes[0], seq_lens):
    for i, a in enumerate(dict.fromkeys(r["arch"] for r in rows)):
      pts = sorted((d, r["eval_acc"]) for (a2, s2, d), r in best.items() if a2 == a and s2 == s)
      if pts:
        ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"ours: {a}")
    for j, (m, by_len) in enumerate(PUBLISHED.items()):
      if s in by_len:
        ax.plot(WIDTHS, by_len[s], "--", color="black" if m == "attention" else "0.6", lw=1.5 if m == "attention"
                else 0.8, label=f"Zoology: {m}" if m == "attention" else ("Zoology: gated convs" if j == 1 else None))
    ax.set_xscale("log", base=2)
    ax.set_xticks(WIDTHS, [str(w) for w in WIDTHS])
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"seq_len {s} ({SHAPES[s]} pairs)")
    ax.set_xlabel("d_model")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("MQAR accuracy")
  axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def report(grid_name):
  jsonl = os.path.join(RESULTS, f"mqar_{grid_name}.jsonl")
  with open(jsonl) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  main_rows = [r for r in rows if budget(r["variant"]) == ("-cpu" if grid_name == "cpu" else "")]
  with open(os.path.join(RESULTS, f"mqar_{grid_name}.md"), "w") as f:
    f.write(table(rows, grid_name))
  figure(main_rows, os.path.join(RESULTS, f"mqar_{grid_name}.png"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", metavar="OUT_DIR", help="train every run of the grid (run directories go here)")
  parser.add_argument("--report", action="store_true", help="write the .md and .png from the grid's JSONL")
  parser.add_argument("--grid", default="cpu", choices=("cpu", "full"))
  parser.add_argument("--deadline", default="", help="UTC HH:MM: start no run after it")
  parser.add_argument("--only", nargs="*", default=(), choices=VARIANTS[1:], metavar="VARIANT",
                      help="run these variants (at the grid's learning rates and seeds) instead of the grid")
  args = parser.parse_args()
  if args.run:
    deadline = None
    if args.deadline:
      now = time.gmtime()
      h, m = (int(x) for x in args.deadline.split(":"))
      deadline = time.time() + ((h * 60 + m) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    run(args.run, args.grid, os.path.join(RESULTS, f"mqar_{args.grid}.jsonl"), deadline,
        log=lambda msg: print(msg, flush=True), only=args.only)
  if args.report or args.run:
    report(args.grid)


if __name__ == "__main__":
  main()
