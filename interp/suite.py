"""The CoT probe suite of `altbench probe RUN --suite cot`: probes per layer x step with controls and a
random-init baseline, faithfulness tests and the monitorability score of a reasoning run, written to
RUN/probe/*.json and PNG plots.

Files (all under RUN/probe/):
  probes.json          {target: {layer: {step: probe result}}}: accuracy, control_accuracy, selectivity with
                       its bootstrap interval, majority (chance), and the same probe on a randomly initialised
                       model of the same config (random_accuracy, random_selectivity); step "all" pools steps
  faithfulness.json    interp.faithfulness.run_tests' summary (early answering, adding mistakes, filler)
  monitorability.json  the score with the monitor used (target, layer) and its parts
  summary.json         run, checkpoint step, family, task, mode, items, what was skipped and why
  probes_<target>.png  accuracy / selectivity / random-init accuracy heatmaps, layer x step
  faithfulness.png     early-answering and adding-mistakes curves
Layers: the token families' `embed` and `blocks.{i}.resid_post` (interp.capture names); recurrent depth's
`embed`, the core state after each recurrence `core.state.{r}` (r = 1..R) and `final_norm`, all at the "#"
position (see interp.targets), so its "layers" are the recurrences.
"""

import json
import os

import numpy as np
from flax import nnx
from tqdm import tqdm

from interp import capture, faithfulness, probes, targets
from train import reasoning_tasks as rt
from train.metrics import write_json_atomic

SUITES = ("cot",)
MONITOR = {"reach": ("path_first", "path_second"), "vartrack": ("value",), "mult": None}  # None: every target


def _layer_names(family_name, model):
  if family_name == "recurrent":
    return ["embed", "core.state", "final_norm"]
  return ["embed"] + [f"blocks.{i}.resid_post" for i in range(len(model.cfg.pattern))]


def activations(family_name, model, rows_BL, pos_list, chunk=64):
  """{layer: (b, len(pos_list), d)} float32 activations at the given positions of every row."""
  names = _layer_names(family_name, model)
  out = {}
  pos = np.asarray(pos_list)
  for s in range(0, len(rows_BL), chunk):
    _, cache = capture.run_with_cache(model, rows_BL[s:s + chunk], names=names)
    for name, value in cache.items():
      value = np.asarray(value, np.float32)
      if name == "core.state":  # (r, b, l, d): one layer per recurrence
        for r in range(value.shape[0]):
          out.setdefault(f"core.state.{r + 1}", []).append(value[r][:, pos])
      else:
        out.setdefault(name, []).append(value[:, pos])
  order = [n for n in names if n != "core.state"]
  if "core.state" in names:
    order = ["embed"] + sorted((k for k in out if k.startswith("core.state.")), key=lambda k: int(k.split(".")[-1])) \
        + ["final_norm"]
  return {name: np.concatenate(out[name]) for name in order}


def _probe_grid(tgts, acts, acts_random, pos_index, bar, seed=0, n_boot=200):
  """{target: {layer: {step: result}}} and the pooled per-item hits of every target x layer (for the monitor)."""
  grid, pooled = {}, {}
  for name, t in tgts.items():
    cols = pos_index[t.pos]
    steps = sorted(set(t.step.tolist()))
    for layer in acts:
      x_all = acts[layer][t.example, cols]
      xr_all = acts_random[layer][t.example, cols]
      if t.pos2 is not None:  # a diagonal bilinear probe: the product with the second position's activation
        x_all = x_all * acts[layer][t.example, pos_index[t.pos2]]
        xr_all = xr_all * acts_random[layer][t.example, pos_index[t.pos2]]
      for k in steps + ["all"]:
        sel = np.ones(len(t.step), bool) if k == "all" else t.step == k
        bar.update(1)
        if len(np.unique(t.example[sel])) < 4:
          continue
        kw = dict(kind="class", n_classes=t.n_classes, seed=seed, n_boot=n_boot)
        r = probes.probe(x_all[sel], t.label[sel], t.type[sel], t.example[sel], **kw)
        rr = probes.probe(xr_all[sel], t.label[sel], t.type[sel], t.example[sel], **kw)
        res = probes.json_ready(r)
        res.update(random_accuracy=rr["accuracy"], random_selectivity=rr["selectivity"])
        grid.setdefault(name, {}).setdefault(layer, {})[str(k)] = res
        test = np.flatnonzero(sel)[r["test_mask"]]
        pooled[(name, layer, str(k))] = {(int(t.example[i]), int(t.step[i])): bool(c)
                                         for i, c in zip(test, r["correct"])}
  return grid, pooled


def _monitor(task, recurrent_depth, tgts, grid, pooled, per_item):
  """The monitorability score, with the faithfulness tests' interventions on each step. The monitor: for token
  chains, the pooled (all steps) probes of the monitored targets at the layer where their mean pooled
  selectivity is highest; for recurrent depth, step k's probe on the state after recurrence k + 1."""
  names = [n for n in (MONITOR.get(task) or sorted(tgts)) if n in grid]
  if not names or "intervened" not in per_item:
    return {"skipped": "no probe results or no interventions for this subject"}
  intervened = per_item["intervened"]
  n_steps = max((len(r) for r in intervened), default=0)
  if recurrent_depth:
    layer = "core.state.{k+1}"
    hits = [{key: v for k in range(n_steps) for key, v in pooled.get((n, f"core.state.{k + 1}", str(k)), {}).items()}
            for n in names]
  else:
    layers = list(grid[names[0]])
    score = lambda layer: np.mean([grid[n].get(layer, {}).get("all", {}).get("selectivity", -1.0) for n in names])
    layer = max(layers, key=score)
    hits = [pooled.get((n, layer, "all"), {}) for n in names]
  items = sorted({e for h in hits for e, _ in h})
  rec = np.zeros((len(items), n_steps), bool)
  valid = np.zeros((len(items), n_steps), bool)
  inter = np.full((len(items), n_steps), None, object)
  for a, e in enumerate(items):
    for k in range(n_steps):
      keys = [h.get((e, k)) for h in hits if (e, k) in h]
      if keys and k < len(intervened[e]):
        valid[a, k] = True
        rec[a, k] = all(keys)
        inter[a, k] = intervened[e][k]
  answers = [per_item["full"][e] for e in items]
  r = faithfulness.monitorability(rec, valid, answers, inter)
  r.pop("monitorable")
  return {**r, "targets": names, "layer": layer, "items": "held-out examples of the pooled probes",
          "as_predicted": "the answer after the intervention differs from the full-chain answer"}


def _plots(out_dir, grid, faith):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  written = []
  for name, by_layer in grid.items():
    layers = list(by_layer)
    steps = sorted({k for v in by_layer.values() for k in v if k != "all"}, key=int) + ["all"]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.2 * len(steps) * 3, 1 + 0.45 * len(layers)), squeeze=False)
    for ax, (key, title, vmin) in zip(axes[0], (("accuracy", "accuracy", 0), ("selectivity", "selectivity", -0.2),
                                                ("random_accuracy", "random-init accuracy", 0))):
      m = np.array([[by_layer[l].get(k, {}).get(key, np.nan) for k in steps] for l in layers], float)
      im = ax.imshow(m, vmin=vmin, vmax=1, cmap="viridis", aspect="auto")
      ax.set_xticks(range(len(steps)), steps)
      ax.set_yticks(range(len(layers)), layers, fontsize=7)
      ax.set_xlabel("step")
      ax.set_title(f"{name}: {title}", fontsize=9)
      for (i, j), v in np.ndenumerate(m):
        if np.isfinite(v):
          ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w")
      fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = os.path.join(out_dir, f"probes_{name}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  if faith:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    ea = faith["early_answering"]
    axes[0].plot(range(len(ea["same"])), ea["same"], "o-")
    axes[0].set_xlabel("chain kept (steps / thoughts / iterations)")
    axes[0].set_ylabel("same answer as the full chain")
    axes[0].set_title(f"early answering ({faith['kind']}), AOC {ea['aoc']:.2f}", fontsize=9)
    axes[0].set_ylim(-0.05, 1.05)
    for key, label in (("mistakes", "mistake / other example's"), ("mistakes_noise", "norm-matched noise")):
      if key in faith:
        axes[1].plot(range(len(faith[key]["changed"])), faith[key]["changed"], "o-", label=label)
    axes[1].set_xlabel("step intervened on")
    axes[1].set_ylabel("answers changed")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_title("adding mistakes", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "faithfulness.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  return written


def run(run_dir, suite="cot", task=None, n=None, seed=0, progress=True):
  """Run the suite on a run directory; returns summary.json's dict."""
  from train import loop
  if suite not in SUITES:
    raise ValueError(f"--suite {suite!r}: valid: {SUITES}")
  cfg, family, corpus, graphdef, state, _, step = loop.load_run(run_dir)
  if not isinstance(corpus, rt.ReasoningCorpus):
    raise ValueError(f"{run_dir}: data.dataset={cfg.data.dataset!r} is not a reasoning task {sorted(rt.TASKS)}; "
                     "the cot suite needs ground-truth intermediates")
  if task is not None and task != corpus.layout.task:
    raise ValueError(f"--task {task!r}: the run at {run_dir} was trained on {corpus.layout.task!r}")
  model = nnx.merge(graphdef, state["params"], state["rest"])
  random_model = family.build(cfg.model, nnx.Rngs(cfg.train.seed + 1))
  lay = corpus.layout
  examples = corpus.eval_examples()[:n]
  rows = targets.batch(examples, lay, cfg.data.seq_len)["inputs"]
  tgts = targets.targets(examples, lay)
  pos_list = sorted({int(p) for t in tgts.values() for p in np.concatenate([t.pos] + ([t.pos2] if t.pos2 is not None
                                                                                     else []))})
  pos_index = np.zeros(rows.shape[1], np.int64)
  pos_index[pos_list] = np.arange(len(pos_list))
  out_dir = os.path.join(run_dir, "probe")
  os.makedirs(out_dir, exist_ok=True)
  summary = {"run": run_dir, "step": int(step), "family": cfg.family, "task": lay.task, "mode": lay.mode,
             "n_examples": len(examples), "skipped": {}}

  acts = activations(cfg.family, model, rows, pos_list)
  acts_random = activations(cfg.family, random_model, rows, pos_list)
  n_jobs = sum(len(acts) * (len(set(t.step.tolist())) + 1) for t in tgts.values())
  try:
    subj = faithfulness.subject(cfg.family, model, corpus)
  except ValueError as e:
    subj = None
    summary["skipped"]["faithfulness"] = str(e)
  n_faith = 0 if subj is None else 3 * (subj.get("n") or lay.depth + 1) + 2
  with tqdm(total=n_jobs + n_faith, desc=f"probe {os.path.basename(run_dir.rstrip('/'))}", disable=not progress,
            dynamic_ncols=True) as bar:
    grid, pooled = _probe_grid(tgts, acts, acts_random, pos_index, bar, seed)
    write_json_atomic(os.path.join(out_dir, "probes.json"), grid)
    faith = None
    if subj is not None:
      faith, per_item = faithfulness.run_tests(subj, examples, seed=seed, progress=lambda: bar.update(1))
      write_json_atomic(os.path.join(out_dir, "faithfulness.json"), faith)
      mon = _monitor(lay.task, cfg.family == "recurrent", tgts, grid, pooled, per_item)
      write_json_atomic(os.path.join(out_dir, "monitorability.json"), mon)
      summary["monitorability"] = mon.get("score")
  summary["skipped"]["lens"] = "interp.lens is not available yet"
  summary["skipped"]["patching"] = "interp.patching is not available yet"
  summary["plots"] = [os.path.basename(p) for p in _plots(out_dir, grid, faith)]
  summary["probes"] = {name: {layer: by_layer[layer]["all"]["selectivity"] for layer in by_layer if "all" in by_layer[layer]}
                       for name, by_layer in grid.items()}
  write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
  return summary
