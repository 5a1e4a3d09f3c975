"""The arena's leaderboard: leaderboard.json, leaderboard.md and PNG plots from the entries' results.

One section per group (entries scored on the same data at the same budget): bpb groups rank by held-out bits
per byte (diffusion's is the NELBO, an upper bound, marked <=), accuracy groups by greedy-decoding answer
accuracy. Missing (and failed) entries are listed last with the reason. Fields in TIMING vary from run to run (time, energy,
decode speed, runtime memory); everything else is a pure function of the arena spec and seed.
"""

import os
import platform

from altbench.train import loop, metrics

TIMING = ("wall_s", "energy_j", "energy_kwh", "energy_trace_j", "decode_tokens_per_s", "decode_curve",
          "device_peak_bytes")


def energy_axis_label(rows):
  """The energy plot's axis label; an estimate (stated power x wall time, which says nothing wall time does
  not) is named as such on the plot's face."""
  n_est = sum(not r.get("energy_source", "").startswith("measured") for r in rows)
  if not n_est:
    return "energy (kWh), measured"
  which = "every entry" if n_est == len(rows) else f"{n_est} of {len(rows)} entries"
  return f"energy (kWh), ESTIMATED as stated power x wall time for {which}"


def mean_interval(values, level=0.95):
  """(mean, low, high): the t-interval of the mean; (mean, None, None) for fewer than two values."""
  import numpy as np
  from scipy import stats
  x = np.asarray(values, np.float64)
  m = float(x.mean())
  if len(x) < 2:
    return m, None, None
  half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
  return m, m - half, m + half


def paired_difference(row, above):
  """{"mean", "low", "high", "significant"} of row's per-seed scores minus above's (paired: the same seed index
  saw the same data order), or None without at least two seeds each."""
  a, b = row.get("seed_scores"), above.get("seed_scores")
  if not a or not b or len(a) != len(b) or len(a) < 2:
    return None
  m, lo, hi = mean_interval([x - y for x, y in zip(a, b)])
  return {"mean": m, "low": lo, "high": hi, "significant": bool(lo > 0 or hi < 0)}


def _key(metric):
  if metric == "bpb":
    return lambda r: r.get("eval_bpb", float("inf"))
  return lambda r: -r.get("gen_acc", r.get("eval_exact", 0.0))


def write(arena, rows, workdir):
  """Write leaderboard.json, leaderboard.md and the plots; returns the leaderboard dict."""
  groups = []
  for g in arena.groups:
    mine = [r for r in rows if r["group"] == g.name]
    ranked = sorted((r for r in mine if r["status"] == "done"), key=_key(g.metric))
    ranked = [r if i == 0 else {**r, "vs_above": paired_difference(r, ranked[i - 1])} for i, r in enumerate(ranked)]
    missing = [r for r in mine if r["status"] != "done"]
    groups.append({"name": g.name, "metric": g.metric, "budget_flops": g.budget_flops, "about": g.about,
                   "rows": ranked + missing})
  versions = loop.versions()
  host = f"{os.cpu_count()} CPU cores, {platform.machine()}"
  board = {"arena": arena.name, "device": f"{versions['device_kind']} x{versions['devices']} ({versions['backend']}; {host})",
           "versions": versions, "groups": groups, "timing_fields": list(TIMING), "seeds": arena.seeds}
  board["plots"] = plot(board, workdir)
  metrics.write_json_atomic(os.path.join(workdir, "leaderboard.json"), board)
  tmp = os.path.join(workdir, "leaderboard.md.tmp")
  with open(tmp, "w") as f:
    f.write(markdown(board) + "\n")
  os.replace(tmp, os.path.join(workdir, "leaderboard.md"))
  return board


def without_timing(board):
  """The leaderboard without the fields that vary between identical runs (for reproducibility checks)."""
  out = dict(board)
  out["groups"] = [{**g, "rows": [{k: v for k, v in r.items() if k not in TIMING} for r in g["rows"]]}
                   for g in board["groups"]]
  return out


def _f(x, fmt):
  return "" if x is None else format(x, fmt)


def greedy_cell(row):
  """Greedy answer accuracy as the table shows it: "no valid answers" where none was one of the question's
  candidates, "(at chance)" where it is within the 95% binomial interval of guessing (a bare 0.06 on a
  two-candidate task, where guessing gives 0.5, reads as broken)."""
  acc, n, chance = row.get("gen_acc"), row.get("gen_examples") or 0, row.get("chance_acc")
  if acc is None:
    return ""
  if row.get("gen_valid") == 0:
    return f"{acc:.3f} (no valid answers)"
  if chance is not None and n and abs(acc - chance) <= 1.96 * (chance * (1 - chance) / n) ** 0.5:
    return f"{acc:.3f} (at chance)"
  return f"{acc:.3f}"


def _seed_cell(row, key, fmt):
  low, high = row.get(key + "_ci_low"), row.get(key + "_ci_high")
  interval = "" if low is None else f" [{format(low, fmt)}, {format(high, fmt)}]"
  return format(row[key], fmt) + interval


def markdown(board):
  lines = [f"# Arena {board['arena']}", "",
           f"Device: {board['device']}; jax {board['versions']['jax']}, flax {board['versions']['flax']}. "
           "Energy is measured where the hardware reports it and estimated from a stated power otherwise "
           "(column `energy`). XLA/analytic: XLA's cost analysis of the compiled train step over the analytic "
           "FLOPs (XLA counts a loop body once, so recurrent depth's iterations are undercounted there). "
           "Wall time includes compilation. Parameters last."]
  for g in board["groups"]:
    budget = f"{g['budget_flops']:.3g} training FLOPs per entry" if g["budget_flops"] else "not budgeted"
    lines += ["", f"## {g['name']}: {budget}", ""] + ([g["about"], ""] if g["about"] else [])
    acc = g["metric"] == "accuracy"
    score = ["answer acc (greedy)", "chance", "valid answers", "exact (teacher-forced)",
             "test FLOPs/answer"] if acc else ["bpb"]
    seeds = board.get("seeds", 1)
    if seeds > 1:
      score[0] += f", mean [95% CI] of {seeds} seeds"
      score.insert(1, "vs above (paired; * excludes 0)")
    head = ["#", "entry", "family", *score, "FLOPs", "x budget", "kWh", "J", "energy", "wall s", "decode tok/s",
            "XLA/analytic", "step MB", "params"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(g["rows"]):
      if r["status"] != "done":
        lines.append(f"| - | {r['name']} | {r['family']} | **{r['status']}**: {r['reason']} |" + " |" * (len(head) - 4))
        continue
      if acc:
        cells = [greedy_cell(r), _f(r.get("chance_acc"), ".2f"), _f(r.get("gen_valid"), ".3f"),
                 _f(r.get("eval_exact"), ".3f"), _f(r.get("test_flops_per_answer"), ".3g")]
      else:
        bpb = f"{r['eval_bpb']:.4f}" + (f" ± {r['eval_bpb_se']:.4f}" if r.get("eval_bpb_se") else "")
        cells = [("<= " if r.get("bound") else "") + (_seed_cell(r, "eval_bpb", ".4f") if r.get("seed_scores")
                                                      else bpb)]
      if seeds > 1:
        if acc and r.get("seed_scores"):
          tag = greedy_cell(r).partition(" ")[2]  # "(at chance)", "(no valid answers)" or ""
          cells[0] = _seed_cell(r, "gen_acc", ".3f") + (f" {tag}" if tag else "")
        d = r.get("vs_above")
        cells.insert(1, "" if not d else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
                     + (" *" if d["significant"] else ""))
      mem = r.get("step_memory_bytes")
      lines.append("| " + " | ".join([
          str(i + 1), r["name"], r["family"] + (f" {r['pattern']}" if r.get("pattern") else ""), *cells,
          f"{r['flops']:.3g}", _f(r.get("flops_vs_budget"), ".3f"), f"{r['energy_kwh']:.3g}", f"{r['energy_j']:.3g}",
          r["energy_source"], f"{r['wall_s']:.0f}", _f(r.get("decode_tokens_per_s"), ".0f"),
          _f(r.get("xla_vs_analytic"), ".3f"), _f(mem / 2 ** 20 if mem else None, ".1f"),
          f"{r['params'] / 1e6:.2f}M"]) + " |")
  if board.get("plots"):
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in board["plots"])]
  return "\n".join(lines)


def plot(board, workdir):
  """PNG plots in workdir; returns their file names."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  done = [(g, r) for g in board["groups"] for r in g["rows"] if r["status"] == "done"]
  bpb = [(g, r) for g, r in done if g["metric"] == "bpb" and g["budget_flops"]]
  reasoning = [r for g, r in done if g["metric"] == "accuracy"]
  written = []

  def save(fig, name):
    tmp = os.path.join(workdir, name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, os.path.join(workdir, name))
    written.append(name)

  if bpb:
    for x_key, name, xlabel in (("flops", "bpb_vs_flops.png", "training FLOPs"), ("energy_j", "bpb_vs_kwh.png", "")):
      fig, ax = plt.subplots(figsize=(7, 4.5))
      for g, r in bpb:
        lines = [l for l in metrics.read_jsonl(os.path.join(workdir, r["name"], "metrics.jsonl")) if "eval_bpb" in l]
        scale = 1 / 3.6e6 if x_key == "energy_j" else 1.0
        ax.plot([l[x_key] * scale for l in lines], [l["eval_bpb"] for l in lines], marker="o",
                linestyle="--" if r.get("bound") else "-", label=r["name"] + (" (bound)" if r.get("bound") else ""))
      ax.set_xscale("log")
      ax.set_xlabel(energy_axis_label([r for _, r in bpb]) if x_key == "energy_j" else xlabel)
      ax.set_ylabel("held-out bits per byte")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
      save(fig, name)
  curves = [r for _, r in done if r.get("decode_curve")]
  if curves:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in curves:
      ctx = sorted(int(c) for c in r["decode_curve"])
      ax.plot(ctx, [r["decode_curve"][str(c)] for c in ctx], marker="o", label=f"{r['name']} ({r['pattern']})")
    ax.set_xscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "decode_vs_context.png")
  if reasoning:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reasoning:
      x = r.get("test_flops_per_answer")
      ax.scatter([x], [r.get("gen_acc", 0.0)], label=f"{r['name']} greedy")
      ax.scatter([x], [r.get("eval_exact", 0.0)], marker="x", color="gray")
      ax.annotate(r["name"], (x, r.get("gen_acc", 0.0)), fontsize=7)
      if r.get("recurrence_sweep"):  # the same model at several test-time recurrences
        sweep = r["recurrence_sweep"]
        ax.plot([p[1] for p in sweep], [p[2] for p in sweep], marker=".", linestyle=":", label=f"{r['name']} r sweep")
        for it, flops, acc in sweep:
          ax.annotate(f"r={it}", (flops, acc), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("forward FLOPs per answer (test-time compute)")
    ax.set_ylabel("answer accuracy (x: teacher-forced exact)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    save(fig, "accuracy_vs_test_compute.png")
  return written
