"""Latent reasoning on generated tasks: no-CoT, CoT, pause, filler, Coconut (with and without its curriculum)
and recurrent depth, at matched parameters and matched training FLOPs.

Tasks (train/reasoning_tasks.py): `reach` (ProsQA-like graph reachability, 24 nodes, paths of 2..5 steps),
`reachbfs` (the same questions with the BFS-frontier CoT: each step the nodes one hop further, which needs no
lookahead; Coconut's thoughts then replace frontiers), `mult` (4 x 4 digit multiplication, reversed digits, iCoT
steps) and `vartrack` (12 assignments, the queried variable at the end of a chain of 1..6: one hop per step, the
shape recurrent depth's iterations fit). Variants are "<task>-<arch>" (a 256-wide model, 4000 CoT-baseline steps of
64 rows: a GPU run), each with a "-cpu" suffix (a 128-wide model, 3000 steps of 32 rows; reach on 12 nodes and paths
of 2..3 steps, 4 x 4 digits, vartrack chains of 1..5 in 10 assignments: 10-15 minutes on a 2-core CPU) and a
"-smoke" suffix (a 64-wide model, 200 steps of 16 rows, 3 x 3 digits, chains of 1..3: a couple of CPU minutes); ""
is reach-coconut. Archs:
  nocot        question <bot><eot> answer
  cot          question <bot> steps <eot> answer (loss on the steps too)
  pause        question <bot> <pause> x k <eot> answer, k = Coconut's number of thoughts, no loss on pauses
  filler       question <bot> "." x len(CoT) <eot> answer (Pfau et al.'s filler tokens)
  coconut      continuous thoughts, Coconut's curriculum: stage s (every steps/(max_stage + 2) steps) replaces
               the first s steps by s * c thoughts; the last two shares of training at the final stage
  coconut-nocurriculum   the final stage (all thoughts, answer only) from step 0
  coconut-readout        coconut with the thoughts' readout loss (`model.thought_loss=1`): through the output
               head each thought should name the tokens of the step it replaces; on reachbfs that is its BFS
               frontier (frontier supervision as in Coconut-BFS, github.com/Ber666/emergence-of-superposition)
  recurrent    recurrent depth on no-CoT data: prelude 1 block, core 2 blocks iterated r ~ lognormal-Poisson
               times (mean E[r] = mean_iters + 1) with truncated backprop, coda 1 block; eval at a fixed r;
               the initial state is zero at the cpu / smoke scales, N(0, 1) (Huginn's) at full scale
The token-level baselines run as family "coconut" with thoughts=0, which is archs.lm's model and loss exactly
(tests/test_reasoning.py) plus the whole-answer exact-match metric ("exact" / "examples"). Every variant
has the parameters of the same 4-block transformer (recurrent depth: MLP width matched for its adapter) and
the CoT baseline's training FLOPs: steps = budget / FLOPs per step (Coconut's thought passes and the core's
iterations cost more per step, so they take fewer steps). Read eval_exact (whole-answer exact match, see the
loop) and eval_acc in metrics.jsonl.

`python -m experiments.reasoning table RUN...` prints a JSON line per run: greedy accuracy with its 95% Wilson
interval, per-character accuracy, accuracy by the question's number of CoT steps, parameters, steps, training
FLOPs (recurrent depth: all at r = 1..8); reach CoT runs also the teacher-forced lookup rate per step
(`lookup_rate`: are the nodes it writes children of the last step's?).
`python -m experiments.reasoning cost [task] [--smoke]` times one training step of CoT, Coconut (recomputing and
cached) and recurrent depth on this machine.
"""

import dataclasses
import sys

from altbench import archs
from altbench.archs import coconut, recurrent
from altbench.train import reasoning_tasks as rt
from altbench.train.config import Config, DataConfig, TrainConfig, check_variant

TASKS = ("reach", "reachbfs", "mult", "vartrack")
ARCHS = ("nocot", "cot", "pause", "filler", "coconut", "coconut-nocurriculum", "coconut-readout", "recurrent")
SCALES = {  # suffix: (model width, batch, CoT-baseline steps, peak lr)
    "": (dict(d_model=256, n_heads=4), 64, 4000, 1e-3),
    "cpu": (dict(d_model=128, n_heads=4), 32, 3000, 3e-3),
    "smoke": (dict(d_model=64, n_heads=2), 16, 200, 3e-3)}
VARIANTS = ("", "smoke") + tuple(f"{t}-{a}{'-' + s if s else ''}" for t in TASKS for a in ARCHS for s in SCALES)
MODES = {"nocot": "nocot", "cot": "cot", "pause": "pause", "filler": "filler", "coconut": "coconut",
         "coconut-nocurriculum": "coconut", "coconut-readout": "coconut", "recurrent": "nocot"}


def task_data(task, scale, mode="cot"):
  task, cot = ("reach", "frontier") if task == "reachbfs" else (task, "")
  knobs = {("reach", ""): dict(task_size=24, task_depth=5, task_thoughts=1),
           ("reach", "cpu"): dict(task_size=12, task_depth=3, task_thoughts=1),
           ("reach", "smoke"): dict(task_size=12, task_depth=3, task_thoughts=1),
           ("mult", ""): dict(task_size=4, task_thoughts=2),
           ("mult", "cpu"): dict(task_size=4, task_thoughts=2),
           ("mult", "smoke"): dict(task_size=3, task_thoughts=1),
           ("vartrack", ""): dict(task_size=12, task_depth=6, task_thoughts=1),
           ("vartrack", "cpu"): dict(task_size=10, task_depth=5, task_thoughts=1),
           ("vartrack", "smoke"): dict(task_size=8, task_depth=3, task_thoughts=1)}[(task, scale)]
  data = DataConfig(dataset=task, task_mode=mode, eval_examples={"": 1024, "cpu": 512, "smoke": 128}[scale],
                    seq_len=4096, task_cot=cot, **knobs)
  # One window for every mode of the task (the longest), so every variant sees the same tokens per step.
  longest = max(rt.layout(dataclasses.replace(data, task_mode=m, task_pause=_thoughts(data))).window
                for m in rt.MODES)
  return dataclasses.replace(data, seq_len=-(-(longest - 1) // 8) * 8, task_pause=_thoughts(data))


def _thoughts(data):
  lay = rt.layout(dataclasses.replace(data, task_mode="coconut"))
  return lay.max_stage * lay.thoughts


def get_config(variant=""):
  check_variant(variant, VARIANTS)
  scale = next((s for s in ("cpu", "smoke") if variant.endswith(s)), "")
  name = variant.removesuffix(scale).removesuffix("-") or "reach-coconut"
  task, _, arch = name.partition("-")
  width, batch, baseline_steps, lr = SCALES[scale]
  data = task_data(task, scale, MODES[arch])
  lay = rt.layout(data)
  base = coconut.Config(pattern="AAAA", **width)  # with thoughts=0: archs.lm's transformer
  if arch.startswith("coconut"):
    family, model = "coconut", dataclasses.replace(base, thoughts=lay.max_stage * lay.thoughts,
                                                   prefix_len=lay.prefix_len,
                                                   thought_loss=1.0 if arch == "coconut-readout" else 0.0)
  elif arch == "recurrent":
    family = "recurrent"
    # At the small scales a zero initial state learns more than Huginn's N(0, 1) (experiments/results/
    # reasoning_cpu.md: 3x3 and 4x4 mult, two seeds each: better or equal in all four); the full scale keeps Huginn's.
    iters = (dict(mean_iters=2.0, max_iters=6, backprop_iters=2, state_std=0.0) if scale
             else dict(mean_iters=4.0, max_iters=12, backprop_iters=4))
    model = recurrent.Config(pattern="AAAA", prelude=1, coda=1, **width, **iters, vocab_size=262)
    model = archs.match_params("recurrent", model, archs.param_count("lm", dataclasses.replace(base, vocab_size=262)))
    model = dataclasses.replace(model, vocab_size=0)
  else:
    family, model = "coconut", base
  # Matched training FLOPs: the CoT baseline's budget over this variant's FLOPs per step.
  seq_len = data.seq_len
  per_step = lambda fam, cfg: archs.get_family(fam).flops_per_token(dataclasses.replace(cfg, vocab_size=262),
                                                                    seq_len) * seq_len * batch
  steps = max(1, round(per_step("coconut", base) * baseline_steps / per_step(family, model)))
  if arch in ("coconut", "coconut-readout"):
    data = dataclasses.replace(data, task_stage_steps=max(1, steps // (lay.max_stage + 2)))
  elif arch == "coconut-nocurriculum":
    data = dataclasses.replace(data, task_stage=lay.max_stage)
  train = TrainConfig(steps=steps, batch_size=batch, lr=lr, warmup_steps=max(1, steps // 20),
                      eval_every=max(1, steps // 4), ckpt_every=0 if scale == "smoke" else max(1, steps // 4),
                      samples=2, sample_len=lay.tail_len + 2, log_every=10)
  return Config(family=family, model=model, data=data, train=train)


# ----------------------------------------------------------------------------- tools


def measure_cost(task="reach", smoke=False, batch=16, repeats=5):
  """Seconds per jitted training step (median of `repeats`, interleaved) of CoT, Coconut recomputing the
  sequence per thought, Coconut decoding thoughts from the prefix cache, and recurrent depth."""
  import time

  import jax.numpy as jnp
  import numpy as np

  from altbench.train import step
  out, runs = {}, {}
  for label, variant in (("cot", f"{task}-cot"), ("coconut-recompute", f"{task}-coconut"),
                         ("coconut-cached", f"{task}-coconut"), ("recurrent", f"{task}-recurrent")):
    cfg = get_config(variant + ("-smoke" if smoke else ""))
    model = dataclasses.replace(cfg.model, vocab_size=262)
    if cfg.family == "coconut":
      model = dataclasses.replace(model, **rt.SPECIAL_IDS)
    if label == "coconut-recompute":
      model = dataclasses.replace(model, prefix_len=0)
    data = dataclasses.replace(cfg.data, task_stage=-1, task_stage_steps=0)  # coconut: the final stage
    family = archs.get_family(cfg.family)
    corpus = rt.ReasoningCorpus(dataclasses.replace(data, eval_examples=1))
    b = {k: jnp.asarray(v)[None] for k, v in corpus.train_batch(0, 0, batch, data.seq_len).items()}
    run, _ = step.fixed_batch_runner(family, model, dataclasses.replace(cfg.train, batch_size=batch), b)
    t0 = time.perf_counter()
    run(1)
    runs[label] = (run, time.perf_counter() - t0, family.flops_per_token(model, data.seq_len) * batch * data.seq_len)
  times = {k: [] for k in runs}
  for _ in range(repeats):
    for label, (run, _, _) in runs.items():
      t0 = time.perf_counter()
      run(1)
      times[label].append(time.perf_counter() - t0)
  for label, (_, compile_s, flops) in runs.items():
    out[label] = {"step_s": float(np.median(times[label])), "compile_s": compile_s, "analytic_flops": flops}
  base = out["cot"]["step_s"]
  for v in out.values():
    v["vs_cot"] = v["step_s"] / base
  return out


def _wilson(k, n, z=1.96):
  """95% Wilson score interval of a binomial proportion k / n."""
  if n == 0:
    return (0.0, 1.0)
  p, d = k / n, 1 + z * z / n
  mid, half = (p + z * z / (2 * n)) / d, z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
  return (max(0.0, mid - half), min(1.0, mid + half))


def lookup_rate(model, corpus, n=256):
  """Reach, CoT layout: per CoT step k, the fraction of the node letters the model predicts (teacher-forced,
  argmax) that lie in the BFS frontier of step k, i.e. are children of the nodes one step back, against
  `exact` (the gold letter) and `random_node` (the rate of a uniformly random node of the graph). Tells a
  model that cannot look an edge up (in-frontier at the rate of a random node) from one that follows edges but
  picks the wrong branch (path CoT) or order (frontier CoT)."""
  import jax
  import numpy as np

  from altbench.interp import targets
  examples, lay = corpus.eval_examples()[:n], corpus.layout
  batch = rt.encode_rows(examples, lay, corpus.cfg.seq_len, lay.max_stage)
  pred = np.asarray(jax.jit(coconut.forward)(model, batch["inputs"]).argmax(-1))
  hits = {}
  for row, ex in enumerate(examples):
    nodes = len({c for c in ex.question if c.isalpha()})
    # step k's byte j is predicted at `before`[k] + j (`before`: where its first byte is predicted)
    before = targets.step_positions(ex, lay, at="before")
    for k, (step, members) in enumerate(zip(ex.steps, ex.intermediates["frontier"])):
      for j in range(1, len(step)):  # the node letters, not the ">" marker
        got = int(pred[row, before[k] + j])
        hits.setdefault(k + 1, []).append((got == ord(step[j]), got < 128 and chr(got) in members,
                                           len(members) / nodes))
  return {k: dict(zip(("exact", "in_frontier", "random_node"), np.mean(v, axis=0).tolist()))
          for k, v in sorted(hits.items())}


def table(run_dirs, n=None, iters=(1, 2, 3, 4, 6, 8)):
  """One JSON-ready row per run: greedy accuracy with its 95% Wilson interval on the held-out questions,
  teacher-forced exact match, parameters, steps and training FLOPs (recurrent depth: accuracy at each r)."""
  import json
  import os

  import numpy as np
  from flax import nnx

  from altbench import archs
  from altbench.train import loop
  rows = []
  for run_dir in run_dirs:
    cfg, family, corpus, graphdef, state, _, step_ = loop.load_run(run_dir)
    model = nnx.merge(graphdef, state["params"], state["rest"])
    last = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
      rec = json.loads(line)
      last.update({k: v for k, v in rec.items() if k in ("flops", "eval_exact", "wall_s")})
    questions = corpus.eval_examples()[:n]
    gold = [ex.answer for ex in questions]
    hops = np.array([len(ex.steps) for ex in questions])
    examples = len(gold)
    row = {"run": os.path.basename(os.path.normpath(run_dir)), "family": cfg.family, "task": corpus.layout.task,
           "cot": corpus.layout.cot, "mode": corpus.layout.mode, "size": corpus.layout.size,
           "depth": corpus.layout.depth,
           "params": archs.param_count(cfg.family, cfg.model), "step": int(step_), "train_flops": last.get("flops"),
           "wall_s": last.get("wall_s"), "seed": cfg.train.seed, "eval_exact": last.get("eval_exact"),
           "questions": examples}
    # recurrent depth: every r of `iters` and the r the model tests at by default
    for r in (sorted({*iters, cfg.model.iters_at_test}) if cfg.family == "recurrent" else [None]):
      kw = {} if r is None else {"iters": r}
      acc, answers = rt.generated_accuracy(family, model, corpus, n, **kw)
      key = "accuracy" if r is None else f"accuracy_r{r}"
      row[key], row[key + "_ci"] = acc, _wilson(round(acc * examples), examples)
      if len(set(hops)) > 1:  # accuracy by the question's number of CoT steps (reach path / vartrack chain)
        right = np.array([a == g for a, g in zip(answers, gold)])
        row[key + "_by_steps"] = {int(k): float(right[hops == k].mean()) for k in sorted(set(hops))}
      # per-character credit (mult's digits): progress that whole-answer exact match hides
      row[key.replace("accuracy", "char_accuracy")] = float(np.mean(
          [sum(a == b for a, b in zip(ans or "", g)) / len(g) for ans, g in zip(answers, gold)]))
    if corpus.layout.task == "reach" and corpus.layout.mode == "cot":
      row["lookup_by_step"] = lookup_rate(model, corpus)
    if cfg.family == "recurrent":
      r = cfg.model.iters_at_test
      row["accuracy"], row["accuracy_ci"] = row[f"accuracy_r{r}"], row[f"accuracy_r{r}_ci"]
      row["char_accuracy"] = row[f"char_accuracy_r{r}"]
    rows.append(row)
  return rows


if __name__ == "__main__":
  import json
  if len(sys.argv) >= 2 and sys.argv[1] == "cost":
    print(json.dumps(measure_cost(*(sys.argv[2:3] or ["reach"]), smoke="--smoke" in sys.argv), indent=1))
  elif len(sys.argv) >= 3 and sys.argv[1] == "table":
    for row in table(sys.argv[2:]):
      print(json.dumps(row))
  else:
    print(__doc__)
