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
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from altbench.interp.notebooks import common

print(f"quick mode: {common.QUICK}; runs in {common.WORKDIR}; jax {jax.__version__} on {jax.default_backend()}")
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
    from altbench import archs
    from flax import nnx

    from altbench.interp import capture, lens, probes, suite, targets

    COCONUT_RUN = None  # or the path of a finished reach-coconut run directory

    cfg = common.experiment_config("reasoning", "reach-coconut-smoke")
    cfg, model, corpus, final = common.train_or_load(cfg, "reach-coconut", COCONUT_RUN)
    lay = corpus.layout
    print(common.describe(cfg))
    print(f"held-out answers exactly right: {final.get('eval_exact', float('nan')):.3f} (picking one of the two "
          "candidates at random: 0.5)")
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

    Nodes are one letter (`a`) and the lens gives a next-byte distribution. A thought stands where a CoT model
    would write `>a`, so much of the lens's mass can sit on `>` (shown as `p('>')`); what we compare is the
    distribution over the 26 letters (renormalised) on the nodes:

    * *frontier*: nodes reachable in exactly *k + 1* steps (`intermediates["frontier"][k]`),
    * *unreachable*: nodes the start cannot reach at all.

    Per question we compare the mean
    letter probability of the two sets; **wins** is the fraction of questions where the frontier gets more
    (0.5: no preference). Thought *k* exists for questions whose path has at least *k + 1* steps.
    """),
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
          seen, nodes = targets.reachable(ex.question)
          f, u = sorted(ex.intermediates["frontier"][k]), sorted(nodes - seen)
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
    the frontier at step *k*. The probe's input is thought *k*'s activation read through the logit lens for *v*
    (`lens.readout_terms`: the final norm of the activation times the head's row for *v*, terms that sum to the
    lens logit of *v*), so one d-wide linear map answers "is this node in the frontier?" for any node.

    The **control task** is the same probe on **another question's** thought *k*, asked about the same nodes: it
    keeps every node and label statistic and loses only this question's thought. (A control that gives each node a
    fixed random label is learned exactly by a probe that is told the node, so it cannot be beaten.)
    **Selectivity** = accuracy - control accuracy is what the thought adds, with a 95% paired bootstrap interval
    over held-out questions. Most nodes are not in the frontier, so a probe can rank the nodes well and still say
    "no" to all of them: read the AUROC and its selectivity too, and `above majority` (accuracy - the majority
    rate). The same probe on a **randomly initialised** model of the same config is the other baseline.
    """),
    code("""
    t = targets.targets(examples, lay)["frontier"]
    positions = sorted(set(t.pos.tolist()))
    column = np.zeros(rows.shape[1], int)
    column[positions] = np.arange(len(positions))
    random_model = archs.get_family(cfg.family).build(cfg.model, nnx.Rngs(cfg.train.seed + 1))
    acts = suite.activations(cfg.family, model, rows, positions)  # {layer: (b, positions, d)}
    acts_random = suite.activations(cfg.family, random_model, rows, positions)
    fit = dict(n_classes=2, n_boot=common.pick(500, 50), steps=common.pick(300, 50))

    probe_table = {}
    for layer in acts:
      x, x_control = suite.query_inputs(t, acts, layer, column[t.pos], model, cfg.family)
      x_random, x_random_control = suite.query_inputs(t, acts_random, layer, column[t.pos], random_model, cfg.family)
      for k in range(K):
        sel = t.step == k
        if len(np.unique(t.example[sel])) < 4:
          continue
        r = probes.probe(x[sel], t.label[sel], t.type[sel], t.example[sel], control_x=x_control[sel], **fit)
        r_random = probes.probe(x_random[sel], t.label[sel], t.type[sel], t.example[sel],
                                control_x=x_random_control[sel], **fit)
        keep = ("accuracy", "control_accuracy", "selectivity", "selectivity_ci", "majority", "above_majority",
                "above_majority_ci", "auroc", "auroc_selectivity", "auroc_selectivity_ci", "n_test")
        probe_table.setdefault(layer, {})[f"thought {k}"] = {**{q: r[q] for q in keep},
                                                              "random_accuracy": r_random["accuracy"]}
        lo, hi = r["selectivity_ci"]
        print(f"{layer:20s} thought {k}: accuracy {r['accuracy']:.3f}  control {r['control_accuracy']:.3f}  "
              f"selectivity {r['selectivity']:+.3f} [{lo:+.3f}, {hi:+.3f}]  majority {r['majority']:.3f}  "
              f"above majority {r['above_majority']:+.3f} [{r['above_majority_ci'][0]:+.3f}, "
              f"{r['above_majority_ci'][1]:+.3f}]  random-init {r_random['accuracy']:.3f}")
    """),
    code("""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
    for ax, key, title in ((axes[0], "selectivity", "accuracy - control accuracy"),
                           (axes[1], "auroc_selectivity", "AUROC - control AUROC")):
      for j, (layer, by_k) in enumerate(probe_table.items()):
        ks = [int(k.split()[1]) for k in by_k]
        sel = np.array([v[key] for v in by_k.values()])
        ci = np.array([v[f"{key}_ci"] for v in by_k.values()]).T
        ax.errorbar(np.array(ks) + 0.08 * j, sel, yerr=[sel - ci[0], ci[1] - sel], fmt="o-", capsize=3, label=layer)
      ax.axhline(0, color="grey", lw=0.5)
      ax.set(xlabel="thought k", ylabel="95% CI", title=f"frontier probe: {title}")
      ax.legend(fontsize=7)
    plt.show()
    """),
    md("""
    ## How to read this

    * The lens comparison is a *preference*, not a decoding: a thought that holds the frontier in superposition
      should give its nodes' letters more mass than the unreachable side's (frontier above unreachable, wins above
      0.5), most clearly in the last block (the thought itself, what the next pass reads). Letter priors the model
      learned from the questions move both sets; differences of a few thousandths are not a search (a model
      trained for a minute here gives wins below 0.5).
    * A probe is evidence only with its baselines: selectivity (accuracy or AUROC) above 0 with its interval clear
      of 0, and accuracy or AUROC above the random-init model's. `embed` at thought *k*'s slot is the thought vector
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

# ----------------------------------------------------------------------------- (b) CoT faithfulness

COT_FAITHFULNESS = [
    md("""
    # Is the chain of thought the computation? Explicit CoT vs Coconut vs recurrent depth on `reach`

    Lanham et al. (2023, "Measuring Faithfulness in Chain-of-Thought Reasoning") test whether a model's answer
    depends on its chain by intervening on it. `interp.faithfulness` runs their tests on three kinds of chain:

    | subject | the chain | trained as |
    |---|---|---|
    | explicit CoT | the steps it writes (`>ab>cd`), its own greedy chain | `reach-cot` |
    | Coconut | its continuous thoughts, one per step | `reach-coconut` |
    | recurrent depth | no chain: the core's iterations stand in for steps | `reach-recurrent` |

    * **Early answering**: keep the first *k* of *n* steps (thoughts, iterations), force the answer (`<eot>#`), and
      count how often it equals the full-chain answer. A flat curve at 1 means the answer was fixed before the
      chain (the chain is decoration); the **area over the curve** (AOC) is 0 then, and near 1 when only the full
      chain gives the answer.
    * **Adding mistakes**: corrupt step *k* (CoT: another node of the graph, then the model continues the chain
      itself; Coconut and recurrent depth: another question's thought/state, or norm-matched noise) and count
      changed answers.
    * **Filler**: replace the chain by `.` (CoT) or `<pause>` (Coconut) of the same length.
    * **Monitorability**: the fraction of questions where a fixed probe recovers the path node at *every* step
      *and* corrupting each step changes the answer (`faithfulness.monitorability`).

    Each model trains in about a minute on a CPU (the smoke variants of `experiments/reasoning.py`); the Coconut
    run is shared with `coconut_thoughts.ipynb`. `ALTBENCH_NOTEBOOK_QUICK=1` trains 4 steps (numbers mean nothing).
    """),
    code(SETUP),
    code("""
    from altbench.interp import faithfulness, probes, suite, targets

    RUNS = {"cot": None, "coconut": None, "recurrent": None}  # or finished run directories of reach-<name>

    models = {}
    for name, run in RUNS.items():
      cfg = common.experiment_config("reasoning", f"reach-{name}-smoke")
      models[name] = common.train_or_load(cfg, f"reach-{name}", run)
      print(f"{name:10s} {common.describe(models[name][0])}: held-out exact {models[name][3].get('eval_exact', float('nan')):.3f}")
    """),
    md("""
    ## The three tests

    `faithfulness.subject` wraps each model with the forward pass its interventions need; `run_tests` returns a
    JSON-ready summary and, per question, the full-chain answer and the answer after intervening on each step
    (used for the monitorability score below). Answers are greedy.
    """),
    code("""
    N = common.pick(64, 12)
    results = {}
    for name, (cfg, model, corpus, final) in models.items():
      subj = faithfulness.subject(cfg.family, model, corpus)
      results[name] = faithfulness.run_tests(subj, corpus.eval_examples()[:N], seed=0)
      s = results[name][0]
      filler = s.get("filler", {})
      print(f"{name:10s} accuracy: full chain {s['accuracy_full_chain']:.2f}, no chain {s['accuracy_no_chain']:.2f}; "
            f"early-answering AOC {s['early_answering']['aoc']:.2f}; filler keeps the answer "
            f"{filler.get('same', float('nan')):.2f}")
    """),
    code("""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for (name, (s, _)), marker in zip(results.items(), "os^"):
      same = s["early_answering"]["same"]
      axes[0].plot(range(len(same)), same, marker + "-", label=f"{name} (AOC {s['early_answering']['aoc']:.2f})")
      changed = s["mistakes"]["changed"]
      axes[1].plot(range(len(changed)), changed, marker + "-", label=f"{name}: mistake / other question")
      if "mistakes_noise" in s:
        noise = s["mistakes_noise"]["changed"]
        axes[1].plot(range(len(noise)), noise, marker + ":", label=f"{name}: norm-matched noise")
    axes[0].set(xlabel="steps / thoughts / iterations kept", ylabel="same answer as the full chain",
                title="early answering", ylim=(-0.05, 1.05))
    axes[1].set(xlabel="step intervened on", ylabel="answers changed", title="adding mistakes", ylim=(-0.05, 1.05))
    for ax in axes:
      ax.legend(fontsize=7)
    plt.show()
    """),
    md("""
    ## Monitorability

    A monitor here is one fixed linear probe of the path node, pooled over steps, reading step *k* at
    its own site: for CoT and Coconut the last block's residual at step *k*'s position (the last byte of a written
    step, or thought *k*'s slot); for recurrent depth the state after iteration *k + 1* at the `#` that predicts
    the answer. It is trained on 3/4 of the questions; a held-out question counts when the node is recovered
    at every step **and** every step's intervention (above: another question's step) changed the answer. A written
    chain is readable almost by construction (its bytes are its tokens), so for CoT the interesting half is
    *causal*; for latent chains both halves are open questions.
    """),
    code("""
    def monitor(cfg, model, corpus, examples, per_item):
      lay = corpus.layout
      rows = targets.batch(examples, lay, cfg.data.seq_len)["inputs"]
      tg = targets.targets(examples, lay)
      positions = sorted(set(tg["path"].pos.tolist()))
      acts = suite.activations(cfg.family, model, rows, positions)
      column = {p: j for j, p in enumerate(positions)}
      site = lambda k: f"core.state.{k + 1}" if cfg.family == "recurrent" else f"blocks.{len(cfg.model.pattern) - 1}.resid_post"
      hit, accuracy = {}, {}
      for name in ("path",):
        t = tg[name]
        keep = np.array([site(k) in acts for k in t.step])  # recurrent depth: steps beyond its iterations drop out
        x = np.stack([acts[site(k)][e, column[p]] for k, e, p in zip(t.step[keep], t.example[keep], t.pos[keep])])
        r = probes.probe(x, t.label[keep], t.type[keep], t.example[keep], n_classes=26, n_boot=common.pick(200, 20),
                         steps=common.pick(300, 50))
        accuracy[name] = r["accuracy"]
        for i, ok in zip(np.flatnonzero(r["test_mask"]), r["correct"]):
          key = (int(t.example[keep][i]), int(t.step[keep][i]))
          hit[key] = hit.get(key, True) and bool(ok)
      inter, full = per_item["intervened"], per_item["full"]
      items = sorted({e for e, _ in hit})
      width = max(len(inter[e]) for e in items)
      recovered, valid = np.zeros((len(items), width), bool), np.zeros((len(items), width), bool)
      intervened = np.full((len(items), width), None, object)
      for a, e in enumerate(items):
        for k in range(len(inter[e])):
          if (e, k) in hit:
            recovered[a, k], valid[a, k], intervened[a, k] = hit[(e, k)], True, inter[e][k]
      score = faithfulness.monitorability(recovered, valid, [full[e] for e in items], intervened)
      score.pop("monitorable")
      return {**score, "probe_accuracy": accuracy}

    monitorability = {}
    for name, (cfg, model, corpus, final) in models.items():
      monitorability[name] = monitor(cfg, model, corpus, corpus.eval_examples()[:N], results[name][1])
      m = monitorability[name]
      print(f"{name:10s} monitorability {m['score']:.2f} over {m['n']} held-out questions: readable {m['readable']:.2f}, "
            f"causal {m['causal']:.2f}; path probe accuracy {m['probe_accuracy']['path']:.2f}")
    """),
    md("""
    ## How to read this

    * Compare early-answering curves by shape: a chain the answer depends on starts low and reaches 1 only at the
      end (high AOC). Recurrent depth usually needs its iterations (its "chain" is compute, not content); whether
      Coconut's thoughts matter shows in both the early-answering and the noise curves.
    * An answer that survives a corrupted step (low *changed*) or filler (high *same*) was not computed from that
      step; a chain can be readable and still not causal, which is why the score needs both.
    * Early answering moves `<eot>#` for Coconut and changes the compute for recurrent depth, so a high AOC alone
      can come from the shorter input rather than from what the thoughts hold; the mistake and noise curves, which
      keep the length, separate the two.
    * A model trained for a minute is near chance on `reach` (0.5: two candidates), so its chains are mostly
      noise; run `altbench train experiments/reasoning.py:reach-<name>` and pass the run directories in `RUNS` for
      real numbers, or `altbench probe RUN --suite cot` for the full probe grid and plots.
    """),
    code("""
    common.summary("cot_faithfulness", {
        name: {"summary": results[name][0], "monitorability": monitorability[name],
               "chain_length": (models[name][2].layout.max_stage * models[name][2].layout.thoughts if name == "coconut"
                                else models[name][1].cfg.iters_at_test if name == "recurrent" else None)}
        for name in models})
    """, tags=("summary",)),
]

# ----------------------------------------------------------------------------- (c) lenses across steps

LENSES_ACROSS_STEPS = [
    md("""
    # Lenses across recurrences and across denoising steps

    The logit lens (nostalgebraist, 2020) reads an intermediate residual stream through the model's own final norm
    and unembedding; the **tuned lens** (Belrose et al., 2023) first applies a learned affine translator per layer
    (zero-initialised, so it starts as the logit lens), trained to match the model's final distribution. Both are
    in `interp.lens`. This notebook turns them on two axes that are not layers:

    1. **Recurrences** of a recurrent-depth model (`archs.recurrent`: prelude, a core iterated *r* times, coda),
       trained on `reach` without a chain: does the answer appear in the core state as the iterations go on? Three
       reads of the state after iteration *r*: the logit lens, the tuned lens (one translator shared by all
       iterations), and the *coda lens* (the coda blocks too: the model's output had it stopped after *r*).
    2. **Denoising steps** of a masked-diffusion model (MDLM, `archs.diffusion`) trained on Python source
       (`pystdlib`): the second half of held-out windows is masked and a greedy confidence sampler reveals it over
       *S* steps (`run_with_cache(..., steps=S)`). At every step and block: how soon does the lens agree with the
       token the position finally gets?

    Each model trains in about a minute on a CPU; the recurrent-depth run is shared with `cot_faithfulness.ipynb`.
    `ALTBENCH_NOTEBOOK_QUICK=1` trains 4 steps of tiny models (numbers mean nothing).
    """),
    code(SETUP),
    code("""
    from flax import nnx

    from altbench.archs import diffusion
    from altbench.interp import capture, lens, targets

    RECURRENT_RUN = None  # or a finished run directory of experiments/reasoning.py:reach-recurrent
    MDLM_RUN = None       # or one of experiments/diffusion.py:mdlm

    cfg, model, corpus, final = common.train_or_load(common.experiment_config("reasoning", "reach-recurrent-smoke"),
                                                     "reach-recurrent", RECURRENT_RUN)
    R = model.cfg.iters_at_test
    print(f"{common.describe(cfg)}: {R} iterations at test; held-out exact {final.get('eval_exact', float('nan')):.3f}")
    """),
    md("""
    ## Recurrent depth: the answer across iterations

    `core.state` *(R, b, l, d)* is the state after each iteration *s_1 .. s_R*. We read it at the `#` position,
    whose next token is the answer, and compare each read with the model's own output (the coda
    after *R* iterations) by KL divergence, and by top-1 agreement with it and with the gold letter. The coda lens
    at *r = R* is the model's output itself (the check below), and the tuned lens starts as the logit lens (its
    fitting loss at step 0 is the logit lens's KL over all positions).
    """),
    code("""
    lay = corpus.layout
    examples = corpus.eval_examples()
    rows = targets.batch(examples, lay, cfg.data.seq_len)["inputs"]
    at = lay.prefix_len + 1  # the '#' after <eot>: it predicts the answer
    assert (rows[:, at] == ord("#")).all()
    gold = np.array([ord(ex.answer[0]) for ex in examples])

    names = ("core.state",)
    out, cache = capture.run_with_cache(model, rows, names=names, iters=R)
    tuned, tuned_losses = lens.fit_tuned_lens(model, [rows], names, steps=common.pick(300, 20), iters=R)
    graphdef, state = nnx.split(model)

    @jax.jit
    def reads(state, s_RBLD):
      m = nnx.merge(graphdef, state)
      h = s_RBLD[:, :, at]
      coda = jax.vmap(lambda s: lens.coda_lens(m, s)[:, at])(s_RBLD)
      return {"logit lens": lens.logit_lens(m, h), "tuned lens": lens.tuned_lens(m, tuned, "core.state", h),
              "coda lens": coda}

    def kl(p_logits, q_logits):
      logp, logq = jax.nn.log_softmax(p_logits, -1), jax.nn.log_softmax(q_logits, -1)
      return np.asarray(jnp.sum(jnp.exp(logp) * (logp - logq), -1).mean(-1))

    own = np.asarray(out[:, at])
    recurrent_reads = {k: np.asarray(v) for k, v in reads(state, cache["core.state"]).items()}
    coda_check = float(np.abs(recurrent_reads["coda lens"][-1] - own).max())
    recurrent_table = {}
    for name, logits_RBV in recurrent_reads.items():
      top = logits_RBV.argmax(-1)
      recurrent_table[name] = {"kl": kl(jnp.asarray(own)[None], jnp.asarray(logits_RBV)).tolist(),
                               "agree": (top == own.argmax(-1)).mean(-1).tolist(), "gold": (top == gold).mean(-1).tolist()}
      print(f"{name:10s} KL to the output per iteration: " + " ".join(f"{v:.3f}" for v in recurrent_table[name]["kl"]))
    print(f"|coda lens at r = R - output| = {coda_check:.2e}; tuned-lens fit KL {float(tuned_losses[0]):.3f} -> "
          f"{float(tuned_losses[-1]):.3f}")
    """),
    code("""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    r = np.arange(1, R + 1)
    for name, row in recurrent_table.items():
      axes[0].plot(r, row["kl"], "o-", label=name)
      axes[1].plot(r, row["gold"], "o-", label=name)
    axes[0].set(xlabel="iteration r", ylabel="KL(output || read) at '#'", title="recurrent depth: reads of s_r", xticks=r)
    axes[1].set(xlabel="iteration r", ylabel="top-1 = gold answer", ylim=(-0.05, 1.05), xticks=r)
    for ax in axes:
      ax.legend(fontsize=8)
    plt.show()
    """),
    md("""
    ## Masked diffusion: lenses across denoising steps

    The sampler's state at step *s* is a canvas with some positions still `<mask>`; each step runs the denoiser
    once and reveals the most confident masked positions. `steps.blocks.{i}.resid_post` *(S, b, l, d)* holds every
    block's residual at every step. On the positions still masked at step *s* we read each block with the logit
    lens (and a tuned lens fitted on single denoiser passes over randomly masked held-out windows), turn the logits
    into the SUBS distribution the sampler uses (`diffusion.subs_log_probs`: no mass on `<mask>`), and measure

    * **agree**: the read's top token equals the token that position ends up with,
    * **KL** from the last block's distribution (the model's own at that step) to the read.

    Compare agreement with `constant_baseline`, the rate of always guessing the most common final token: a model
    trained for a minute fills much of the canvas with spaces.

    The check: at the step a position is revealed, the last block's top token *is* the revealed token (the logit
    lens of the last block is the model's output), so `revealed_agree` must be 1.
    """),
    code("""
    dcfg = common.experiment_config("diffusion", "mdlm-smoke", steps=200)  # a third of the smoke run: about a minute
    dcfg, dmodel, dcorpus, dfinal = common.train_or_load(dcfg, "mdlm", MDLM_RUN)
    print(f"{common.describe(dcfg)}: held-out bits per byte <= {dfinal.get('eval_bpb', float('nan')):.3f}")
    B, L, S = common.pick(16, 4), dcfg.data.seq_len, common.pick(16, 4)
    mask_id, n_blocks = dmodel.cfg.mask_id, len(dcfg.model.pattern)
    clean = dcorpus.eval_batches(B, L)[0]["inputs"][:B]
    canvas = clean.copy()
    canvas[:, L // 2:] = mask_id  # keep the first half, denoise the second
    tokens, dcache = capture.run_with_cache(dmodel, canvas, names=["steps.canvas", "steps.blocks.*.resid_post"], steps=S)
    tokens, canvases = np.asarray(tokens), np.asarray(dcache["steps.canvas"])  # final tokens; (S, b, l) inputs per step

    # the tuned lens: single denoiser passes (steps=0) over held-out windows masked at random rates
    rng = np.random.default_rng(0)
    noised = [np.where(rng.random(clean.shape) < rng.random((B, 1)), mask_id, clean) for _ in range(2)]
    block_names = [f"blocks.{i}.resid_post" for i in range(n_blocks - 1)]
    dtuned, dtuned_losses = lens.fit_tuned_lens(dmodel, noised, block_names, steps=common.pick(300, 20))
    print(f"tuned-lens fit KL {float(dtuned_losses[0]):.3f} -> {float(dtuned_losses[-1]):.3f}")
    """),
    code("""
    dgraphdef, dstate = nnx.split(dmodel)

    @jax.jit
    def step_reads(dstate, h_SBLD, canvases_SBL, own_SBLV, params):
      m = nnx.merge(dgraphdef, dstate)
      logits = lens.logit_lens(m, h_SBLD) if params is None else lens.tuned_lens(m, {"h": params}, "h", h_SBLD)
      logp = diffusion.subs_log_probs(logits, canvases_SBL, mask_id)
      kl = jnp.sum(jnp.exp(own_SBLV) * (own_SBLV - logp), -1)
      return logp, jnp.argmax(logp, -1), kl

    masked = canvases == mask_id  # (S, b, l): still to be revealed at step s
    last = jnp.asarray(dcache[f"steps.blocks.{n_blocks - 1}.resid_post"])
    own, own_top, _ = step_reads(dstate, last, canvases, jnp.zeros(canvases.shape + (dmodel.cfg.vocab_size,)), None)
    revealed = masked & (np.concatenate([canvases[1:], tokens[None]]) != mask_id)  # revealed by step s
    revealed_agree = float((np.asarray(own_top) == tokens[None])[revealed].mean())

    def per_step(values_SBL):
      return [float(values_SBL[s][masked[s]].mean()) if masked[s].any() else float("nan") for s in range(S)]

    # what always guessing the most common final token would score: a weak model fills text with spaces
    final_masked = tokens[masked[0]]
    constant = float(np.bincount(final_masked).max() / final_masked.size)
    diffusion_table = {"masked_fraction": masked.mean((1, 2)).tolist(), "revealed_agree": revealed_agree,
                       "constant_baseline": constant}
    for lens_name in ("logit lens", "tuned lens"):
      rows_ = {}
      for i in range(n_blocks):
        params = dtuned.get(f"blocks.{i}.resid_post") if lens_name == "tuned lens" else None  # last block: None
        _, top, kl_ = step_reads(dstate, jnp.asarray(dcache[f"steps.blocks.{i}.resid_post"]), canvases, own, params)
        rows_[f"blocks.{i}"] = {"agree": per_step(np.asarray(top) == tokens[None]), "kl": per_step(np.asarray(kl_))}
      diffusion_table[lens_name] = rows_
    print(f"revealed positions where the last block's top token is the one written: {revealed_agree:.3f}; "
          f"always the most common final token would agree {constant:.2f}")
    for lens_name in ("logit lens", "tuned lens"):
      for block, row in diffusion_table[lens_name].items():
        print(f"{lens_name} {block}: agree per step " + " ".join(f"{v:.2f}" for v in row["agree"]))
    """),
    code("""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, lens_name in zip(axes, ("logit lens", "tuned lens")):
      m = np.array([row["agree"] for row in diffusion_table[lens_name].values()])
      im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
      ax.set(xlabel="denoising step", ylabel="block", title=f"{lens_name}: top-1 = final token",
             yticks=range(n_blocks))
      fig.colorbar(im, ax=ax)
    plt.show()
    """),
    md("""
    ## How to read this

    * Recurrent depth: a KL that falls with *r* and a gold-letter rate that rises say the answer is built up across
      iterations; a tuned lens far below the logit lens says the state holds the answer in a basis the unembedding
      does not read directly (the coda translates it). With `run_with_cache(..., iters=2 * R)` the same reads show
      whether the iteration converges past the depth it was tested at.
    * Diffusion: early steps see mostly masks, so agreement starts low and rises as the canvas fills; rows are
      blocks, so the heatmap shows at which depth a position's final token becomes readable, and whether that
      depth moves as context accumulates. The last block agrees fully only at the step a position is revealed (the
      sampler writes its top token then; later steps never change it).
    """),
    code("""
    common.summary("lenses_across_steps", {
        "recurrent": {"iters": R, "coda_check": coda_check, "tuned_loss": [float(tuned_losses[0]), float(tuned_losses[-1])],
                      **recurrent_table},
        "diffusion": {"steps": S, "blocks": n_blocks, "tuned_loss": [float(dtuned_losses[0]), float(dtuned_losses[-1])],
                      **diffusion_table}})
    """, tags=("summary",)),
]

NOTEBOOKS = {"coconut_thoughts": COCONUT_THOUGHTS, "cot_faithfulness": COT_FAITHFULNESS,
             "lenses_across_steps": LENSES_ACROSS_STEPS}


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
