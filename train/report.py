"""`altbench report`: a table of runs' final metrics and a plot of loss and bits per byte against FLOPs."""

import json
import os

from train.metrics import read_jsonl


def report(runs, png_path):
  rows, curves = [], []
  for run in runs:
    lines = read_jsonl(os.path.join(run, "metrics.jsonl"))
    if not lines:
      raise FileNotFoundError(f"{run} has no metrics.jsonl lines")
    cfg = json.load(open(os.path.join(run, "config.json")))["config"]
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
  return "\n".join(out)


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
