"""`altbench report`: a table of runs' final metrics, a plot of loss and bits per byte against FLOPs, and what
general-purpose compressors achieve on the same held-out bytes."""

import os

from altbench.train.config import read_run_config
from altbench.train.metrics import read_jsonl


def report(runs, png_path, compressors=True):
  rows, curves, configs = [], [], []
  for run in runs:
    lines = read_jsonl(os.path.join(run, "metrics.jsonl"))
    if not lines:
      raise FileNotFoundError(f"{run} has no metrics.jsonl lines")
    cfg = read_run_config(run)
    configs.append(cfg)
    train = [l for l in lines if "loss" in l]
    evals = [l for l in lines if "eval_bpb" in l]
    last = lines[-1]
    rows.append({"run": run, "family": cfg["family"], "pattern": cfg["model"].get("pattern", ""),
                 "step": last["step"], "loss": train[-1]["loss"] if train else float("nan"),
                 "eval_bpb": evals[-1]["eval_bpb"] if evals else float("nan"),
                 "flops": last["flops"], "wall_s": last["wall_s"], "energy_j": last["energy_j"],
                 "energy": last.get("energy_source", "")})
    curves.append((run, train, evals))
  _plot(curves, png_path)
  head = "| run | family | pattern | step | train loss | eval bpb | FLOPs | wall s | energy J |"
  out = [head, "|" + "---|" * 9]
  for r in rows:
    out.append(f"| {r['run']} | {r['family']} | {r['pattern']} | {r['step']} | {r['loss']:.4f} | "
               f"{r['eval_bpb']:.4f} | {r['flops']:.3g} | {r['wall_s']:.1f} | {r['energy_j']:.3g} |")
  out.append(f"\nenergy: {'; '.join(sorted({r['energy'] for r in rows}))}\nplot: {png_path}")
  if compressors:
    out += compressor_table([cfg["data"] for cfg in configs])
  return "\n".join(out)


def compressor_table(data_dicts):
  """Lines of a table: what gzip, bzip2, xz (and zstd) achieve on the held-out bytes the runs are scored on."""
  import dataclasses

  from altbench.train import compressors
  from altbench.train.config import DataConfig
  from altbench.train.tasks import TASKS
  fields = {f.name for f in dataclasses.fields(DataConfig)}
  seen, lines = [], []
  for d in data_dicts:
    cfg = DataConfig(**{k: v for k, v in d.items() if k in fields})
    key = (cfg.dataset, cfg.heldout_fraction, cfg.eval_bytes)
    if key in seen or cfg.dataset in TASKS:  # generated tasks have no fixed held-out text
      continue
    seen.append(key)
    try:
      n, bpb = compressors.compressor_bpb(cfg)
    except (OSError, ValueError) as e:
      lines.append(f"| (compressors on {cfg.dataset}: {e}) | | | |")
      continue
    lines += [f"| {name} | {cfg.dataset} | {n} | {value:.4f} |" for name, value in bpb.items()]
  if not lines:
    return []
  return ["\nCompressors (not models) on the same held-out bytes, whole text in one file, headers included:",
          "| compressor | dataset | bytes | bpb |", "|---|---|---|---|"] + lines


def _plot(curves, png_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
  for run, train, evals in curves:
    label = os.path.basename(run.rstrip("/"))
    ax_loss.plot([l["flops"] for l in train], [l["loss"] for l in train], label=label)
    ax_bpb.plot([l["flops"] for l in evals], [l["eval_bpb"] for l in evals], marker="o", label=label)
  for ax, name in ((ax_loss, "train loss (nats/token)"), (ax_bpb, "held-out bits per byte")):
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = png_path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, png_path)
