"""Activation patching between a clean and a counterfactual (corrupted) input, one site at a time, with heatmaps.

A site is one position of one named activation (capture's names), or one (step, position) of a stepped name
(thoughts., core., steps.; names without a position axis, such as thoughts.vector, are patched whole per
step). Directions:
  denoise   run the corrupted input with the clean run's activation at the site (does it restore the answer?)
  noise     run the clean input with the corrupted run's activation at the site (does it break the answer?)
Either way the effect is normalised as (m - m_corrupt) / (m_clean - m_corrupt): 0 = the corrupted run's
metric, 1 = the clean run's, where m is a metric of the output averaged over the batch, usually a logit
difference between the clean and the counterfactual answer (logit_diff). Clean and corrupted inputs must
have the same shape, so counterfactuals are symmetric token replacements (reach_counterfactual: another
start node, from which the distractor is reachable instead of the answer).

sweep() compiles one program: both reference runs, then for each name every site as a batch of patched
forward passes (jax.lax.map in chunks of `chunk` sites, each chunk vmapped).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from altbench.interp import capture, targets
from altbench.train import reasoning_tasks as rt

STEPPED = ("thoughts.", "core.", "steps.")  # prefixes of names with a leading step axis
DIRECTIONS = ("denoise", "noise")


def position_axis(name):
  """The position axis of one step's value of `name` (None: no position axis, patched whole)."""
  if name.endswith("attn.pattern"):
    return 2  # (b, h, query, key): a site is a query position
  if name == "thoughts.vector":
    return None
  return 1


def logit_diff(logits_BLV, position, good_B, bad_B):
  """(b,) logit of the good token minus that of the bad token at `position` (int or (b,) ints)."""
  b = logits_BLV.shape[0]
  row_BV = logits_BLV[jnp.arange(b), jnp.broadcast_to(jnp.asarray(position), (b,))]
  return row_BV[jnp.arange(b), good_B] - row_BV[jnp.arange(b), bad_B]


def sweep(model, clean, corrupt, metric, names, direction="denoise", chunk=32, **forward_kw):
  """Patch every site of every name, one at a time. metric: out -> (b,) or scalar (averaged over the batch).

  Returns (effects, m_clean, m_corrupt): effects {name: (positions,) or, for stepped names,
  (steps, positions)} normalised effects; m_clean and m_corrupt the unpatched metrics.
  """
  if direction not in DIRECTIONS:
    raise ValueError(f"direction={direction!r}: valid: {DIRECTIONS}")
  clean, corrupt = jnp.asarray(clean), jnp.asarray(corrupt)
  if clean.shape != corrupt.shape:
    raise ValueError(f"clean {clean.shape} and corrupt {corrupt.shape} inputs must have the same shape")
  names = tuple(names)
  graphdef, state = nnx.split(model)

  def run(state, clean, corrupt):
    m = nnx.merge(graphdef, state)
    score = lambda out: jnp.mean(metric(out))
    clean_out, clean_cache = capture.trace(m, clean, names, **forward_kw)
    corrupt_out, corrupt_cache = capture.trace(m, corrupt, names, **forward_kw)
    m_clean, m_corrupt = score(clean_out), score(corrupt_out)
    source, target = (clean_cache, corrupt) if direction == "denoise" else (corrupt_cache, clean)
    effects = {}
    for name in names:
      value = source[name]
      stepped = name.startswith(STEPPED)
      axis = position_axis(name)
      n_steps = value.shape[0] if stepped else 1
      n_pos = 1 if axis is None else value.shape[axis + stepped]
      steps_S, pos_S = (a.ravel() for a in jnp.meshgrid(jnp.arange(n_steps), jnp.arange(n_pos), indexing="ij"))

      def one(site, name=name, value=value, stepped=stepped, axis=axis):
        s, p = site
        patch = capture.at(value, None if axis is None else p, axis=axis or 1, steps=s if stepped else None)
        return score(capture.trace(m, target, (), {name: patch}, **forward_kw)[0])

      scores = jax.lax.map(one, (steps_S, pos_S), batch_size=chunk)
      effect = ((scores - m_corrupt) / (m_clean - m_corrupt)).reshape(n_steps, n_pos)
      effects[name] = effect if stepped else effect[0]
    return effects, m_clean, m_corrupt

  effects, m_clean, m_corrupt = jax.jit(run)(state, clean, corrupt)
  return {n: effects[n] for n in names}, m_clean, m_corrupt  # in the order asked (jit sorts dict keys)


def heatmap(effects, path, title=None, xlabels=None):
  """Write a PNG of the effects (rows: names, one per step for stepped names; columns: positions)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows, labels = [], []
  for name, e in effects.items():
    e = np.asarray(e)
    for s, row in enumerate(e if e.ndim == 2 else e[None]):
      rows.append(row)
      labels.append(f"{name}[{s}]" if e.ndim == 2 else name)
  widths = {len(r) for r in rows}
  if len(widths) != 1:
    raise ValueError(f"effects have different position counts {sorted(widths)}: plot names of one part together")
  grid = np.stack(rows)
  fig, ax = plt.subplots(figsize=(max(4, 0.3 * grid.shape[1] + 3), max(2, 0.3 * len(rows) + 1)))
  im = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
  ax.set_yticks(range(len(labels)), labels, fontsize=7)
  if xlabels is not None:
    ax.set_xticks(range(len(xlabels)), xlabels, fontsize=7)
  ax.set_xlabel("position")
  fig.colorbar(im, ax=ax, label="effect (0 corrupt, 1 clean)")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def reach_counterfactual(ex):
  """The reach example with its start node replaced by another node of the graph from which the distractor
  candidate is reachable and the answer is not: the answer flips, the question keeps its length (one byte
  changes), and steps / intermediates (path, frontiers, distractor) are those of the new question. None when
  no node qualifies."""
  m = re.fullmatch(r"(.*)\|(\w)\?(\w)/(\w)", ex.question)
  if m is None:
    raise ValueError(f"question={ex.question!r}: not a reach question (edges|start?c1/c2)")
  edges = [tuple(e.split(">")) for e in m.group(1).split(",")]
  answer, distractor = ex.answer, ex.intermediates["distractor"]
  for node in sorted({v for e in edges for v in e} - {m.group(2)}):
    dist, parent = targets.distances(edges, node)
    if distractor in dist and answer not in dist:
      path = [distractor]
      while path[-1] != node:
        path.append(parent[path[-1]])
      path = path[::-1][1:]
      frontier = [sorted(v for v, d in dist.items() if d == k) for k in range(1, len(path) + 1)]
      # the example's CoT form: its steps are its path's unless they are its frontiers (or both read alike)
      cot = "path" if ex.steps == rt.reach_steps(ex.intermediates["path"], None) else "frontier"
      return dataclasses.replace(
          ex, question=f"{m.group(1)}|{node}?{m.group(3)}/{m.group(4)}", answer=distractor,
          steps=rt.reach_steps(path, frontier, cot),
          intermediates={"start": node, "path": path, "frontier": frontier, "distractor": answer})
  return None
