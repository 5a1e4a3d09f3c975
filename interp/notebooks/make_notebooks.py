"""Writes the interp notebooks, without outputs, from the cells in this file:

    python interp/notebooks/make_notebooks.py

Edit the cells here, not the .ipynb files: tests/test_notebooks.py checks that the stored notebooks are what this
script writes (and executes them in quick mode). Each notebook prints one JSON summary in its last cell (tagged
"summary") that the test reads.
"""

import os
import textwrap

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """
import os
import sys

# The repository root (experiments/ is imported from it): the folder above the notebook, found from the cwd.
root = os.getcwd()
while not os.path.exists(os.path.join(root, "experiments", "reasoning.py")):
  if os.path.dirname(root) == root:
    raise RuntimeError(f"cwd {os.getcwd()!r} is not inside the altbench repository (no experiments/reasoning.py above it)")
  root = os.path.dirname(root)
sys.path.insert(0, root)

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from interp.notebooks import common

print(f"quick mode: {common.QUICK}; runs in {common.WORKDIR}; jax {jax.__version__} on {jax.default_backend()}")
"""

REACHABLE = """
def reachable(question):
  \"\"\"(nodes reachable from the start, all nodes) of a reach question "ab>cd,...|start?c1/c2".\"\"\"
  edges = [e.split(">") for e in question.split("|")[0].split(",")]
  start = question.split("|")[1].split("?")[0]
  seen, todo = {start}, [start]
  while todo:
    v = todo.pop()
    for a, b in edges:
      if a == v and b not in seen:
        seen.add(b)
        todo.append(b)
  return seen, {x for e in edges for x in e}
"""


def md(text):
  return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text, tags=()):
  cell = nbformat.v4.new_code_cell(textwrap.dedent(text).strip())
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


# ----------------------------------------------------------------------------- (a) Coconut's thoughts

COCONUT_THOUGHTS = [
    md("""
    # Reading a Coconut model's continuous thoughts on `reach`

    A Coconut model (Hao et al., 2024) does not write its chain of thought: after `<bot>` it feeds its own last
    hidden state back as the next input embedding, once per *continuous thought*, then writes `<eot>` and the
    answer. On `reach` (ProsQA-like graph reachability: edges `ab>cd`, then `|start?c1/c2`, exactly one candidate
    reachable) the written chain would be the path from the start, one node per step, so thought *k* stands where
    step *k* would be: the node at distance *k + 1*. Coconut's paper found that its thoughts hold a *frontier*:
    several nodes at that distance at once, a breadth-first search in superposition.

    This notebook asks two questions of a tiny model:

    1. **Logit lens** (`interp.lens`): read each thought, and the residual stream of the pass that makes it,
       through the model's own final norm and unembedding. Does it prefer nodes reachable in *k + 1* steps over
       unreachable nodes?
    2. **Frontier probe** (`interp.probes`, `interp.targets`): can a linear probe on thought *k* tell which nodes
       are in the frontier at step *k*, better than its control task (Hewitt & Liang, 2019)?

    It trains the model in about a minute on a CPU (`experiments/reasoning.py:reach-coconut-smoke`, without mid-run
    evals). With `ALTBENCH_NOTEBOOK_QUICK=1` it trains 4 steps of a 2-block model: the code runs, the numbers mean
    nothing. To read a bigger model set `COCONUT_RUN` below to a run directory of
    `altbench train experiments/reasoning.py:reach-coconut`.
    """),
    code(SETUP),
    code("""
    import archs
    from flax import nnx

    from interp import capture, lens, probes, suite, targets

    COCONUT_RUN = None  # or the path of a finished reach-coconut run directory

    cfg = common.reasoning_config("reach-coconut")
    cfg, model, corpus, final = common.train_or_load(cfg, "reach-coconut", COCONUT_RUN)
    lay = corpus.layout
    print(common.describe(cfg))
    print(f"held-out answers exactly right: {final.get('eval_exact', float('nan')):.3f} (chance: 0.5, two candidates)")
    """),
    md("""
    ## Capturing the thoughts

    `interp.capture.run_with_cache` runs the family's forward pass with every activation named. For Coconut the
    thought passes are recomputed: pass *k* is a full pass over the row that fills thought *k*, and its activations
    carry a leading thought axis (`thoughts.blocks.{i}.resid_post` is *(K, b, l, d)*). `thoughts.vector` *(K, b, d)*
    is thought *k* as written into the input: the normed last hidden state of pass *k* at the position just before
    thought *k*'s slot. With `<bot>` at `prefix_len - 1` = *P - 1* and one thought per step, thought *k* sits at
    *P + k* and is read at *P + k - 1*.

    The check below is the lens's anchor: the unembedding of the thought vector equals the logit lens of the last
    block's residual at the read position (a wrong position or pass would not match).
    """),
    code("""
    examples = corpus.eval_examples()
    rows = targets.batch(examples, lay, cfg.data.seq_len)["inputs"]  # the final stage: every step a thought
    P, K = lay.prefix_len, lay.max_stage * lay.thoughts
    n_layers = len(cfg.model.pattern)
    _, cache = capture.run_with_cache(model, rows, names=["thoughts.vector", "thoughts.blocks.*.resid_post"])

    read_at = [P - 1 + k for k in range(K)]  # where pass k reads thought k (c = 1 thought per step)
    resid_LKBD = np.stack([np.asarray(cache[f"thoughts.blocks.{i}.resid_post"])[np.arange(K), :, read_at]
                           for i in range(n_layers)])
    lens_LKBV = np.asarray(lens.logit_lens(model, jnp.asarray(resid_LKBD)))
    own_KBV = np.asarray(lens.unembed(model, cache["thoughts.vector"]))
    lens_check = float(np.abs(lens_LKBV[-1] - own_KBV).max())
    print(f"{K} thoughts, {n_layers} blocks, {len(examples)} questions; |lens(last block) - unembed(thought)| = {lens_check:.2e}")
    """),
    md("""
    ## Logit lens: which nodes does thought *k* point to?

    Nodes are two bytes (`ab`) and the lens gives a next-byte distribution. A thought stands where a CoT model
    would write `>ab`, so much of the lens's mass can sit on `>` (shown as `p('>')`); what we compare is the
    distribution over the 26 letters (renormalised) on the **first letters** of the nodes:

    * *frontier*: nodes reachable in exactly *k + 1* steps (`intermediates["frontier"][k]`),
    * *unreachable*: nodes the start cannot reach at all.

    Letters that begin both a frontier and an unreachable node are left out. Per question we compare the mean
    letter probability of the two sets; **wins** is the fraction of questions where the frontier gets more
    (0.5: no preference). Thought *k* exists for questions whose path has at least *k + 1* steps.
    """),
    code(REACHABLE),
    code("""
    probs_LKBV = np.asarray(jax.nn.softmax(jnp.asarray(lens_LKBV), -1))
    letters = probs_LKBV[..., ord("a"):ord("z") + 1]
    letters = letters / letters.sum(-1, keepdims=True)
    lens_table = {}
    for i in range(n_layers):
      for k in range(K):
        front, unreach = [], []
        for e, ex in enumerate(examples):
          if k >= len(ex.intermediates["frontier"]):
            continue
          seen, nodes = reachable(ex.question)
          f = {v[0] for v in ex.intermediates["frontier"][k]}
          u = {v[0] for v in nodes - seen}
          f, u = sorted(f - u), sorted(u - f)
          if f and u:
            front.append(letters[i, k, e, [ord(x) - 97 for x in f]].mean())
            unreach.append(letters[i, k, e, [ord(x) - 97 for x in u]].mean())
        front, unreach = np.array(front), np.array(unreach)
        lens_table[f"blocks.{i}"] = lens_table.get(f"blocks.{i}", {})
        lens_table[f"blocks.{i}"][f"thought {k}"] = {
            "frontier": float(front.mean()), "unreachable": float(unreach.mean()),
            "wins": float((front > unreach).mean()), "n": len(front), "p_gt": float(probs_LKBV[i, k, :, ord(">")].mean()),
            "vocab_sum": float(probs_LKBV[i, k].sum(-1).mean())}
        row = lens_table[f"blocks.{i}"][f"thought {k}"]
        print(f"blocks.{i} thought {k}: frontier {row['frontier']:.3f}  unreachable {row['unreachable']:.3f}  "
              f"wins {row['wins']:.2f} (n={row['n']})  p('>') {row['p_gt']:.2f}")
    """),
    code("""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    last = lens_table[f"blocks.{n_layers - 1}"]
    axes[0].plot(range(K), [last[f"thought {k}"]["frontier"] for k in range(K)], "o-", label="frontier (k + 1 steps)")
    axes[0].plot(range(K), [last[f"thought {k}"]["unreachable"] for k in range(K)], "s--", label="unreachable")
    axes[0].axhline(1 / 26, color="grey", lw=0.5)
    axes[0].set(xlabel="thought k", ylabel="mean letter probability", title="the thought itself (last block)")
    axes[0].legend(fontsize=8)
    wins = np.array([[lens_table[f"blocks.{i}"][f"thought {k}"]["wins"] for k in range(K)] for i in range(n_layers)])
    im = axes[1].imshow(wins, vmin=0, vmax=1, cmap="coolwarm", aspect="auto")
    axes[1].set(xlabel="thought k", ylabel="block", title="wins: frontier > unreachable", xticks=range(K),
                yticks=range(n_layers))
    fig.colorbar(im, ax=axes[1])
    plt.show()
    """),
    md("""
    ## A frontier probe on thought *k*, with its control task

    `interp.targets.frontier` makes one item per (question, step *k*, node *v* of the graph): label 1 when *v* is in
    the frontier at step *k*. The probe's input is the elementwise product of the activation at thought *k*'s slot
    and the activation at *v*'s first mention in the question: a diagonal bilinear probe, so one linear map can
    answer "is this node in the frontier?" for any node.

    The **control task** gives each node a fixed random label (drawn from the label distribution): a probe that only
    memorises node identities does as well on it. **Selectivity** = accuracy - control accuracy is what the thought
    adds, with a 95% paired bootstrap interval over held-out questions. The same probe on a **randomly initialised**
    model of the same config is the other baseline, and `majority` is the chance level (most nodes are not in the
    frontier).
    """),
    code("""
    t = targets.targets(examples, lay)["frontier"]
    positions = sorted(set(t.pos.tolist()) | set(t.pos2.tolist()))
    column = np.zeros(rows.shape[1], int)
    column[positions] = np.arange(len(positions))
    random_model = archs.get_family(cfg.family).build(cfg.model, nnx.Rngs(cfg.train.seed + 1))
    acts = suite.activations(cfg.family, model, rows, positions)  # {layer: (b, positions, d)}
    acts_random = suite.activations(cfg.family, random_model, rows, positions)
    fit = dict(n_classes=2, n_boot=common.pick(500, 50), steps=common.pick(300, 50))

    probe_table = {}
    for layer in acts:
      x = acts[layer][t.example, column[t.pos]] * acts[layer][t.example, column[t.pos2]]
      x_random = acts_random[layer][t.example, column[t.pos]] * acts_random[layer][t.example, column[t.pos2]]
      for k in range(K):
        sel = t.step == k
        if len(np.unique(t.example[sel])) < 4:
          continue
        r = probes.probe(x[sel], t.label[sel], t.type[sel], t.example[sel], **fit)
        r_random = probes.probe(x_random[sel], t.label[sel], t.type[sel], t.example[sel], **fit)
        keep = ("accuracy", "control_accuracy", "selectivity", "selectivity_ci", "majority", "n_test")
        probe_table.setdefault(layer, {})[f"thought {k}"] = {**{q: r[q] for q in keep},
                                                              "random_accuracy": r_random["accuracy"]}
        lo, hi = r["selectivity_ci"]
        print(f"{layer:20s} thought {k}: accuracy {r['accuracy']:.3f}  control {r['control_accuracy']:.3f}  "
              f"selectivity {r['selectivity']:+.3f} [{lo:+.3f}, {hi:+.3f}]  majority {r['majority']:.3f}  "
              f"random-init {r_random['accuracy']:.3f}")
    """),
    code("""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for j, (layer, by_k) in enumerate(probe_table.items()):
      ks = [int(k.split()[1]) for k in by_k]
      sel = np.array([v["selectivity"] for v in by_k.values()])
      ci = np.array([v["selectivity_ci"] for v in by_k.values()]).T
      ax.errorbar(np.array(ks) + 0.08 * j, sel, yerr=[sel - ci[0], ci[1] - sel], fmt="o-", capsize=3, label=layer)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="thought k", ylabel="selectivity (95% CI)", title="frontier probe: accuracy - control accuracy")
    ax.legend(fontsize=7)
    plt.show()
    """),
    md("""
    ## How to read this

    * The lens comparison is a *preference*, not a decoding: a thought that holds the frontier in superposition
      should give its nodes' letters more mass than the unreachable side's (frontier above unreachable, wins above
      0.5), most clearly in the last block (the thought itself, what the next pass reads).
    * A probe is evidence only with its baselines: selectivity above 0 with its interval clear of 0, and accuracy
      above both the majority rate and the random-init model's. `embed` at thought *k*'s slot is the thought vector
      itself (the thought is the input there).
    * The tiny model here is trained for a minute; `altbench probe RUN --suite cot` runs the same probes on every
      layer x step of a real run, with the faithfulness tests (see `cot_faithfulness.ipynb`).
    """),
    code("""
    common.summary("coconut_thoughts", {
        "thoughts": K, "layers": n_layers, "examples": len(examples), "final": final, "lens_check": lens_check,
        "lens": lens_table, "probe": probe_table})
    """, tags=("summary",)),
]

NOTEBOOKS = {"coconut_thoughts": COCONUT_THOUGHTS}


def build(name):
  nb = nbformat.v4.new_notebook()
  nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                 "language_info": {"name": "python"}}
  nb.cells = [nbformat.from_dict(dict(c)) for c in NOTEBOOKS[name]]
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{name}-{i:02d}"  # stable ids: regenerating gives the same file
  return nb


def main():
  for name in NOTEBOOKS:
    path = os.path.join(HERE, f"{name}.ipynb")
    nbformat.write(build(name), path)
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
