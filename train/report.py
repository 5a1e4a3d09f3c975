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
  rl_runs = [(run, [l for l in read_jsonl(os.path.join(run, "metrics.jsonl")) if "reward" in l or
                    "eval_pass_at_1" in l]) for run in runs]
  rl_runs = [(run, lines) for run, lines in rl_runs if lines]
  if rl_runs:  # GRPO runs (train.objective=grpo): reward and pass@1 against the RL step
    rl_png = os.path.splitext(png_path)[0] + "_rl.png"
    _plot_rl(rl_runs, rl_png)
    out += ["\nGRPO runs: rollout reward and pass@1 (mean of the last 10 steps), eval pass@1 (sampled) at the start "
            "and the end", "| run | RL steps | reward | pass@1 | eval pass@1 start | eval pass@1 end |",
            "|---|---|---|---|---|---|"]
    for run, lines in rl_runs:
      steps = [l for l in lines if "reward" in l][-10:]
      evals = [l for l in lines if "eval_pass_at_1" in l]
      mean = lambda k: sum(l[k] for l in steps) / max(len(steps), 1)
      ends = [f"{evals[i]['eval_pass_at_1']:.4f} (step {evals[i]['step']})" if evals else "" for i in (0, -1)]
      out.append(f"| {run} | {lines[-1]['step']} | {mean('reward'):.4f} | {mean('pass_at_1'):.4f} | {ends[0]} | "
                 f"{ends[1]} |")
    out.append(f"plot: {rl_png}")
  if compressors:
    out += compressor_table([cfg["data"] for cfg in configs])
  return "\n".join(out)


def _plot_rl(rl_runs, png_path):
  """Rollout reward and pass@1 per RL step (and eval pass@1 as markers) for each GRPO run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(11, 4))
  for run, lines in rl_runs:
    label = os.path.basename(run.rstrip("/"))
    steps = [l for l in lines if "reward" in l]
    evals = [l for l in lines if "eval_pass_at_1" in l]
    ax_r.plot([l["step"] for l in steps], [l["reward"] for l in steps], label=label)
    line, = ax_p.plot([l["step"] for l in steps], [l["pass_at_1"] for l in steps], alpha=0.5, label=f"{label} rollouts")
    ax_p.plot([l["step"] for l in evals], [l["eval_pass_at_1"] for l in evals], marker="o", color=line.get_color(),
              label=f"{label} eval")
  for ax, name in ((ax_r, "rollout reward (rl.checker)"), (ax_p, "pass@1 (true checker)")):
    ax.set_xlabel("RL step")
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  _save(fig, png_path)


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
  _save(fig, png_path)


def _save(fig, png_path):
  """Write the figure atomically (a killed report leaves no half-written PNG) and close it."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  tmp = png_path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, png_path)
