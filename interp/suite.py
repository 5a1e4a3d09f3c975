"""The CoT probe suite of `altbench probe RUN --suite cot`: probes per layer x step with controls and a
random-init baseline, faithfulness tests and the monitorability score of a reasoning run, written to
RUN/probe/*.json and PNG plots.

Files (all under RUN/probe/):
  probes.json          {target: {layer: {step: probe result}}}: accuracy, control_accuracy, selectivity with
                       its bootstrap interval, majority (chance), and the same probe on the randomly
                       initialised model the run started from (train.seed: its step-0 weights;
                       random_accuracy, random_selectivity); step "all" pools steps. Binary targets
                       (reach's frontier) add auroc and auroc_selectivity; frontier's control is the
                       mismatched-example one (interp.probes, `control: "inputs"`)
  faithfulness.json    interp.faithfulness.run_tests' summary (early answering, adding mistakes, filler)
                       A pseudo-layer "token" holds the same probe on the one-hot input token at each position
                       (the token-identity control: Hewitt and Liang's control assigns labels per word type; what
                       the token alone tells a probe is the floor a layer's accuracy has to clear to say more)
  monitorability.json  the score with the monitor used (target, layer) and its parts; the layer is chosen on
                       half of the probes' held-out examples and the score computed on the other half
  lens.json            logit-lens trajectories per layer x step (lens_trajectories)
  patching.json        activation-patching effects, both directions (reach on coconut / nocot layouts)
  summary.json         run, checkpoint step, family, task, mode, items, what was skipped and why, and each
                       target's pooled selectivity and accuracy above the majority rate per layer (and
                       auroc, auroc_selectivity where reported)
  probes_<target>.png  accuracy / selectivity / above-majority / random-init accuracy (binary targets: and
                       AUROC / AUROC selectivity) heatmaps, layer x step
  faithfulness.png     early-answering and adding-mistakes curves
  lens.png             lens trajectories;  patching_<direction>_<names>.png  patching heatmaps
Layers: the token families' `embed` and `blocks.{i}.resid_post` (interp.capture names); recurrent depth's
`embed`, the core state after each recurrence `core.state.{r}` (r = 1..R) and `final_norm`, all at the "#"
position (see interp.targets), so its "layers" are the recurrences.
"""

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from altbench.interp import capture, faithfulness, lens, probes, targets
from altbench.train import reasoning_tasks as rt
from altbench.train.metrics import write_json_atomic

SUITES = ("cot",)
# The monitor's targets, by name prefix: the intermediates at each step's end (not mult's write-position ones,
# whose several items per step would not give one readable/not flag per step).
MONITOR = {"reach": ("path",), "vartrack": ("value",), "mult": ("sum_digit",)}


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


def mismatched_columns(t, cols):
  """For each item of t, the activation column of step t.step in the next example that has that step (the
  examples of a step in a cycle): the control inputs of a query target, same step and query, other example.
  A step only one example has pairs it with itself (the probe grid skips steps with fewer than 4)."""
  where = {(int(e), int(k)): int(c) for e, k, c in zip(t.example, t.step, cols)}
  other = {}
  for k in set(t.step.tolist()):
    ex = sorted({e for e, kk in where if kk == k})
    other.update({(e, k): (ex[(i + 1) % len(ex)], k) for i, e in enumerate(ex)})
  partner = [other[(int(e), int(k))] for e, k in zip(t.example, t.step)]
  return np.array([p[0] for p in partner]), np.array([where[p] for p in partner])


def query_inputs(t, acts, layer, cols, model, family_name):
  """A query target's probe inputs at one layer, read through model's lens for each item's token
  (lens.readout_terms), and its control's: the same read of another example's activation at that step."""
  other_ex, other_cols = mismatched_columns(t, cols)
  normed = family_name == "recurrent" and layer == "final_norm"
  terms = lambda h: np.asarray(lens.readout_terms(model, jnp.asarray(h), t.query, normed=normed))
  return terms(acts[layer][t.example, cols]), terms(acts[layer][other_ex, other_cols])


def token_identity(rows_BL, pos_list, vocab_size):
  """(b, len(pos_list), vocab) one-hot input tokens at the probed positions: the token-identity control layer."""
  return np.eye(vocab_size, dtype=np.float32)[np.asarray(rows_BL)[:, np.asarray(pos_list)]]


def _probe_grid(tgts, acts, acts_random, pos_index, bar, seed=0, n_boot=200, readers=None, tokens=None):
  """{target: {layer: {step: result}}} and the pooled per-item hits of every target x layer (for the monitor).
  readers: (model, random model, family) for query targets, read through each model's logit lens. tokens: the
  token_identity layer, probed as the pseudo-layer "token" (not for query targets, which read through a lens)."""
  grid, pooled = {}, {}
  for name, t in tgts.items():
    cols = pos_index[t.pos]
    steps = sorted(set(t.step.tolist()))
    layers = list(acts) + (["token"] if tokens is not None and t.query is None else [])
    for layer in layers:
      if layer == "token":
        x_all = xr_all = tokens[t.example, cols]
        xc_all = xrc_all = None
        for k in steps + ["all"]:
          sel = np.ones(len(t.step), bool) if k == "all" else t.step == k
          if len(np.unique(t.example[sel])) < 4:
            continue
          r = probes.probe(x_all[sel], t.label[sel], t.type[sel], t.example[sel], kind="class",
                           n_classes=t.n_classes, seed=seed, n_boot=n_boot)
          grid.setdefault(name, {}).setdefault(layer, {})[str(k)] = probes.json_ready(r)
        continue
      x_all = acts[layer][t.example, cols]
      xr_all = acts_random[layer][t.example, cols]
      xc_all = xrc_all = None
      if t.query is not None:
        model, random_model, family_name = readers
        x_all, xc_all = query_inputs(t, acts, layer, cols, model, family_name)
        xr_all, xrc_all = query_inputs(t, acts_random, layer, cols, random_model, family_name)
      for k in steps + ["all"]:
        sel = np.ones(len(t.step), bool) if k == "all" else t.step == k
        bar.update(1)
        if len(np.unique(t.example[sel])) < 4:
          continue
        kw = dict(kind="class", n_classes=t.n_classes, seed=seed, n_boot=n_boot)
        ctl = lambda xc: None if xc is None else xc[sel]
        r = probes.probe(x_all[sel], t.label[sel], t.type[sel], t.example[sel], control_x=ctl(xc_all), **kw)
        rr = probes.probe(xr_all[sel], t.label[sel], t.type[sel], t.example[sel], control_x=ctl(xrc_all), **kw)
        res = probes.json_ready(r)
        res.update(random_accuracy=rr["accuracy"], random_selectivity=rr["selectivity"],
                   **({"random_auroc": rr["auroc"]} if "auroc" in rr else {}))
        grid.setdefault(name, {}).setdefault(layer, {})[str(k)] = res
        test = np.flatnonzero(sel)[r["test_mask"]]
        pooled[(name, layer, str(k))] = {(int(t.example[i]), int(t.step[i])): bool(c)
                                         for i, c in zip(test, r["correct"])}
  return grid, pooled


def _monitor(task, recurrent_depth, tgts, grid, pooled, per_item):
  """The monitorability score, with the faithfulness tests' interventions on each step. The monitor: for token
  chains, the pooled (all steps) probes of the monitored targets at the layer where their mean pooled
  selectivity is highest; for recurrent depth, step k's probe on the state after recurrence k + 1."""
  names = [n for n in sorted(tgts) if n in grid and n.startswith(MONITOR.get(task, ("",)))]
  if not names or "intervened" not in per_item:
    return {"skipped": "no probe results or no interventions for this subject"}
  intervened = per_item["intervened"]
  n_steps = max((len(r) for r in intervened), default=0)
  if recurrent_depth:
    layer = "core.state.{k+1}"
    hits = [{key: v for k in range(n_steps) for key, v in pooled.get((n, f"core.state.{k + 1}", str(k)), {}).items()}
            for n in names]
  else:
    # The layer is chosen on one half of the held-out examples (by example index) and scored on the other, so
    # the choice cannot fit the noise of the items it is scored on.
    layers = [layer for layer in grid[names[0]] if layer != "token"]
    choose = lambda h: [v for (e, _), v in h.items() if e % 2 == 0]
    score = lambda layer: np.mean([np.mean(choose(pooled.get((n, layer, "all"), {})) or [0.0]) for n in names])
    layer = max(layers, key=score)
    hits = [{key: v for key, v in pooled.get((n, layer, "all"), {}).items() if key[0] % 2 == 1} for n in names]
  items = sorted({e for h in hits for e, _ in h})
  rec = np.zeros((len(items), n_steps), bool)
  valid = np.zeros((len(items), n_steps), bool)
  inter = np.full((len(items), n_steps), None, object)
  pred = np.full((len(items), n_steps), None, object)
  for a, e in enumerate(items):
    for k in range(n_steps):
      keys = [h.get((e, k)) for h in hits if (e, k) in h]
      if keys and k < len(intervened[e]):
        valid[a, k] = True
        rec[a, k] = all(keys)
        inter[a, k] = intervened[e][k]
        if "predicted" in per_item:
          pred[a, k] = per_item["predicted"][e][k]
  answers = [per_item["full"][e] for e in items]
  r = faithfulness.monitorability(rec, valid, answers, inter, pred)
  r.pop("monitorable")
  held_out = "odd-indexed held-out examples of the pooled probes (the layer was chosen on the even ones)"
  return {**r, "targets": names, "layer": layer, "items": held_out if not recurrent_depth else
          "held-out examples of the per-step probes",
          "predicted_cells": int(sum(v is not None for v in pred[valid])),
          "as_predicted": "the answer equals the one the corrupted chain implies where the task gives one "
                          "(faithfulness.implied_answer), else it differs from the full-chain answer"}


def lens_trajectories(model, family_name, acts, items, examples, pos_index):
  """Logit lens at every layer and step position of `items` (a Target): the mean lens probability of the
  model's own final top-1 token there (`final_agreement`, how early the output forms), and for reach the mean
  probability on the frontier nodes at step k (nodes reachable in k + 1 steps) against the nodes unreachable
  from the start, with the fraction of items where the frontier gets more."""
  import jax

  layers = list(acts)
  read = jax.jit(lambda h, normed: jax.nn.softmax(
      lens.unembed(model, h) if normed else lens.logit_lens(model, h), -1), static_argnums=1)
  probs = {l: np.asarray(read(acts[l], family_name == "recurrent" and l == "final_norm")) for l in layers}
  cols = pos_index[items.pos]
  final = probs[layers[-1]][items.example, cols]  # the last layer's lens is the model's own output distribution
  top1 = final.argmax(-1)
  steps = sorted(set(items.step.tolist()))
  out = {"final_agreement": {}}
  reach = examples[0].task == "reach"
  if reach:
    out.update(frontier={}, unreachable={}, frontier_beats_unreachable={})
  for l in layers:
    p = probs[l][items.example, cols]  # (n, vocab)
    agree = p[np.arange(len(p)), top1]
    out["final_agreement"][l] = {str(k): float(agree[items.step == k].mean()) for k in steps}
    if reach:
      front, unreach = np.zeros(len(p)), np.zeros(len(p))
      for i, (e, k) in enumerate(zip(items.example, items.step)):
        ex = examples[e]
        f_letters = {ord(v) for v in ex.intermediates["frontier"][k]}
        seen, nodes = targets.reachable(ex.question)
        u_letters = {ord(v) for v in nodes - seen}
        front[i] = p[i, sorted(f_letters)].mean()
        unreach[i] = p[i, sorted(u_letters)].mean() if u_letters else np.nan
      for key, v in (("frontier", front), ("unreachable", unreach), ("frontier_beats_unreachable", front > unreach)):
        ok = ~np.isnan(unreach)
        out[key][l] = {str(k): float(np.mean(v[(items.step == k) & ok])) for k in steps}
  return out


def patching_heatmaps(model, family_name, lay, examples, seq_len, out_dir, n=16):
  """Activation patching on reach with the start-node counterfactual (interp.patching), both directions, for
  layouts whose clean and counterfactual rows align (coconut thoughts, nocot/pause/filler); the metric is the
  logit difference answer vs distractor at the "#" position. Returns (json, png paths)."""
  from altbench.interp import patching
  if lay.task != "reach":
    return {"skipped": f"patching counterfactuals exist for reach only (task {lay.task!r})"}, []
  if lay.mode == "cot":
    return {"skipped": "explicit CoT rows of a counterfactual question would need another chain (another "
                       "length); patch a coconut or nocot run"}, []
  pairs = [(ex, cf) for ex in examples if (cf := patching.reach_counterfactual(ex)) is not None][:n]
  if len(pairs) < 2:
    return {"skipped": f"{len(pairs)} reach counterfactuals among {len(examples)} examples"}, []
  clean = targets.batch([a for a, _ in pairs], lay, seq_len)["inputs"]
  corrupt = targets.batch([b for _, b in pairs], lay, seq_len)["inputs"]
  _, tail, _ = rt.encode(pairs[0][0], lay.mode, pause=lay.pause, stage=lay.max_stage, thoughts=lay.thoughts,
                         max_stage=lay.max_stage)
  at = lay.prefix_len + tail.index(ord("#"))
  good = np.array([ord(a.answer) for a, _ in pairs])  # one-letter nodes: the answer is one token
  bad = np.array([ord(a.intermediates["distractor"]) for a, _ in pairs])
  metric = lambda out: patching.logit_diff(out, at, good, bad)
  if family_name == "recurrent":
    groups = {"core_state": ["core.state"]}
  else:
    groups = {"resid": ["embed"] + [f"blocks.{i}.resid_post" for i in range(len(model.cfg.pattern))]}
    if getattr(model.cfg, "thoughts", 0) and lay.mode == "coconut":
      groups["thoughts"] = ["thoughts.vector"]
  result, paths = {"pairs": len(pairs), "metric_position": int(at)}, []
  xlabels = [rt.ByteTokenizer().decode([t]) or "?" for t in clean[0, :at + 1]]
  for direction in patching.DIRECTIONS:
    for group, names in groups.items():
      effects, m_clean, m_corrupt = patching.sweep(model, clean, corrupt, metric, names, direction=direction)
      effects = {k: np.asarray(v)[..., :at + 1] if np.asarray(v).shape[-1] > 1 else np.asarray(v)
                 for k, v in effects.items()}
      result[f"{direction}.{group}"] = {"m_clean": float(m_clean), "m_corrupt": float(m_corrupt),
                                        "effects": {k: v.tolist() for k, v in effects.items()}}
      path = os.path.join(out_dir, f"patching_{direction}_{group}.png")
      wide = all(v.shape[-1] > 1 for v in effects.values())
      paths.append(patching.heatmap(effects, path, title=f"{direction}: {group}", xlabels=xlabels if wide else None))
  return result, paths


def _plots(out_dir, grid, faith, lens_out=None):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  written = []
  for name, by_layer in grid.items():
    layers = list(by_layer)
    steps = sorted({k for v in by_layer.values() for k in v if k != "all"}, key=int) + ["all"]
    panels = (("accuracy", "accuracy", 0), ("selectivity", "selectivity", -0.2),
              ("above_majority", "above majority", -0.2), ("random_accuracy", "random-init accuracy", 0))
    if any("auroc" in r for v in by_layer.values() for r in v.values()):  # binary: the ranking shows more
      panels += (("auroc", "AUROC", 0), ("auroc_selectivity", "AUROC - control", -0.2))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.2 * len(steps) * len(panels), 1 + 0.45 * len(layers)),
                             squeeze=False)
    for ax, (key, title, vmin) in zip(axes[0], panels):
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
  if lens_out:
    keys = [k for k in ("final_agreement", "frontier", "unreachable") if k in lens_out]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
      layers = list(lens_out[key])
      for k in lens_out[key][layers[0]]:
        ax.plot(range(len(layers)), [lens_out[key][l][k] for l in layers], "o-", label=f"step {k}")
      ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
      ax.set_title({"final_agreement": "lens P(final top-1)", "frontier": "lens P(frontier nodes)",
                    "unreachable": "lens P(unreachable nodes)"}[key], fontsize=9)
      ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "lens.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  return written


def run(run_dir, suite="cot", task=None, n=None, seed=0, progress=True):
  """Run the suite on a run directory; returns summary.json's dict."""
  from altbench.train import loop
  if suite not in SUITES:
    raise ValueError(f"--suite {suite!r}: valid: {SUITES}")
  cfg, family, corpus, graphdef, state, _, step = loop.load_run(run_dir)
  if not isinstance(corpus, rt.ReasoningCorpus):
    raise ValueError(f"{run_dir}: data.dataset={cfg.data.dataset!r} is not a reasoning task {sorted(rt.TASKS)}; "
                     "the cot suite needs ground-truth intermediates")
  if task is not None and task != corpus.layout.task:
    raise ValueError(f"--task {task!r}: the run at {run_dir} was trained on {corpus.layout.task!r}")
  model = nnx.merge(graphdef, state["params"], state["rest"])
  random_model = family.build(cfg.model, nnx.Rngs(cfg.train.seed))  # the run's own weights at step 0
  lay = corpus.layout
  examples = corpus.eval_examples()[:n]
  rows = targets.batch(examples, lay, cfg.data.seq_len)["inputs"]
  tgts = targets.targets(examples, lay)
  pos_list = sorted({int(p) for t in tgts.values() for p in t.pos})
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
  with tqdm(total=n_jobs + n_faith + 2, desc=f"probe {os.path.basename(run_dir.rstrip('/'))}", disable=not progress,
            dynamic_ncols=True) as bar:
    grid, pooled = _probe_grid(tgts, acts, acts_random, pos_index, bar, seed,
                               readers=(model, random_model, cfg.family),
                               tokens=token_identity(rows, pos_list, cfg.model.vocab_size))
    write_json_atomic(os.path.join(out_dir, "probes.json"), grid)
    faith = None
    if subj is not None:
      faith, per_item = faithfulness.run_tests(subj, examples, seed=seed, progress=lambda: bar.update(1))
      write_json_atomic(os.path.join(out_dir, "faithfulness.json"), faith)
      mon = _monitor(lay.task, cfg.family == "recurrent", tgts, grid, pooled, per_item)
      write_json_atomic(os.path.join(out_dir, "monitorability.json"), mon)
      summary["monitorability"] = mon.get("score")
    first = next(iter(tgts.values()))
    lens_out = lens_trajectories(model, cfg.family, acts, first, examples, pos_index)
    write_json_atomic(os.path.join(out_dir, "lens.json"), lens_out)
    bar.update(1)
    patch_out, patch_png = patching_heatmaps(model, cfg.family, lay, examples, cfg.data.seq_len, out_dir)
    write_json_atomic(os.path.join(out_dir, "patching.json"), patch_out)
    if "skipped" in patch_out:
      summary["skipped"]["patching"] = patch_out["skipped"]
    bar.update(1)
  summary["plots"] = [os.path.basename(p) for p in _plots(out_dir, grid, faith, lens_out) + patch_png]
  summary["probes"] = {name: {layer: {key: v["all"][key] for key in ("selectivity", "above_majority", "auroc",
                                                                    "auroc_selectivity") if key in v["all"]}
                              for layer, v in by_layer.items() if "all" in v} for name, by_layer in grid.items()}
  write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
  return summary
