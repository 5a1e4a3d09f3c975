"""Shared setup of the interp notebooks: quick mode, where their runs go, and train-or-load of a tiny model.

ALTBENCH_NOTEBOOK_QUICK=1      a handful of training steps and a narrower model (what tests/test_notebooks.py
                               runs): the same code path with smaller numbers, so the numbers mean little.
ALTBENCH_NOTEBOOK_WORKDIR=DIR  where runs are written (default runs/notebooks in the checkout). A finished
                               run of the same config there is loaded instead of retrained, so the notebooks
                               share runs: cot_faithfulness reuses coconut_thoughts' Coconut model and
                               lenses_across_steps the recurrent-depth model of cot_faithfulness.
"""

import json
import os
import sys

from flax import nnx

from altbench.train import config, loop, metrics
from altbench.train import reasoning_tasks as rt

QUICK = os.environ.get("ALTBENCH_NOTEBOOK_QUICK", "0") == "1"


def checkout_root():
  """The altbench checkout the notebook runs in (its experiments/ are read): the working directory or a folder
  above it. The installed package does not carry experiments/, so it is not looked for beside this file."""
  root = os.getcwd()
  while not os.path.exists(os.path.join(root, "experiments", "reasoning.py")):
    if os.path.dirname(root) == root:
      raise FileNotFoundError(f"cwd {os.getcwd()!r} is not inside an altbench checkout (no experiments/reasoning.py "
                              "in it or above it): start the notebook from the repository")
    root = os.path.dirname(root)
  return root


def _default_workdir():
  try:
    return os.path.join(checkout_root(), "runs", "notebooks")
  except FileNotFoundError:  # reading given run directories needs no checkout
    return os.path.abspath(os.path.join("runs", "notebooks"))


WORKDIR = os.environ.get("ALTBENCH_NOTEBOOK_WORKDIR") or _default_workdir()


def pick(full, quick):
  """The full-mode value, or the quick-mode one under ALTBENCH_NOTEBOOK_QUICK=1."""
  return quick if QUICK else full


def run_dir(name):
  return os.path.join(WORKDIR, name + ("-quick" if QUICK else ""))


def experiment_config(experiment, variant, steps=None):
  """experiments/<experiment>.py:<variant> (a "-smoke" variant) for a notebook, with CLI-style --set overrides:
  no mid-run evals, checkpoints or samples (the notebooks read the final state), a small eval set, and in quick
  mode a 2-block 32-wide model (3 blocks for recurrent depth) trained for 4 steps. steps: train.steps instead
  of the experiment's FLOPs-matched count (Coconut's curriculum is rescaled to it)."""
  cfg = config.load_experiment(os.path.join(checkout_root(), "experiments", f"{experiment}.py:{variant}"))
  steps = pick(steps or cfg.train.steps, 4)
  sets = [f"train.steps={steps}", "train.eval_every=0", "train.ckpt_every=0", "train.samples=0",
          f"train.log_every={pick(10, 1)}", f"train.warmup_steps={max(1, steps // 20)}"]
  if cfg.data.dataset in rt.TASKS:
    sets.append(f"data.eval_examples={pick(128, 24)}")
  else:
    sets += [f"data.eval_bytes={pick(8192, 1024)}", "train.eval_repeats=1"]
  if QUICK:
    sets += [f"model.pattern={'AAA' if cfg.family == 'recurrent' else 'AA'}", "model.d_model=32", "train.batch_size=8"]
    if cfg.family == "recurrent":
      sets += ["model.max_iters=3", "model.d_ff=64"]
    if cfg.data.dataset not in rt.TASKS:
      sets.append("data.seq_len=64")
  if cfg.data.task_stage_steps:  # Coconut's curriculum: max_stage + 2 equal shares of the steps
    sets.append(f"data.task_stage_steps={max(1, steps // (rt.layout(cfg.data).max_stage + 2))}")
  return config.apply_overrides(cfg, sets)


def train_or_load(cfg, name, run=None, log=print):
  """(cfg, model, corpus, final metrics) of the run directory `run` if given (it must be of cfg's family, and
  of its task and mode for reasoning tasks), else of cfg trained in WORKDIR/name (resumed if interrupted, loaded
  if already finished)."""
  if run is None:
    run = run_dir(name)
    loop.train(cfg, run, log=log)
  path = os.path.join(run, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{run!r} is not a run directory (no config.json)")
  with open(path) as f:
    saved = config.from_dict(json.load(f)["config"])
  kind = lambda c: (c.family,) + ((c.data.dataset, c.data.task_mode) if cfg.data.dataset in rt.TASKS else ())
  if kind(saved) != kind(cfg):  # checked before restoring anything
    raise ValueError(f"run {run!r} is a {kind(saved)} run; this notebook reads {kind(cfg)} (family, task, mode)")
  cfg, _, corpus, graphdef, state, _, step = loop.load_run(run)
  lines = [m for m in metrics.read_jsonl(os.path.join(run, "metrics.jsonl")) if m.get("final")]
  final = {"step": step, **{k: v for k, v in (lines[-1] if lines else {}).items() if k.startswith("eval_")}}
  return cfg, nnx.merge(graphdef, state["params"], state["rest"]), corpus, final


def describe(cfg):
  """One line: family, blocks, width, steps."""
  m = cfg.model
  return (f"{cfg.family} {m.pattern} d_model={m.d_model}, {cfg.train.steps} steps of {cfg.train.batch_size} on "
          f"{cfg.data.dataset} ({cfg.data.task_mode if cfg.data.dataset in rt.TASKS else 'text'})")


def summary(name, values):
  """Print the notebook's JSON summary (tests/test_notebooks.py parses it)."""
  print(json.dumps({"notebook": name, "quick": QUICK, "python": sys.executable, **values}, indent=1, default=float))
