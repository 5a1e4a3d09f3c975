"""The arena: equal budgets, the energy ledger, resume without retraining, missing families, a reproducible
leaderboard, and analytic FLOPs against XLA's cost analysis for the families not covered elsewhere."""

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altbench import archs
from altbench.archs import blt, coconut, diffusion, lm, megabyte, recurrent
from conftest import ROOT, replace, tiny_config
from altbench.train import arena, ledger, leaderboard, loop, metrics
from altbench.train import reasoning_tasks as rt
from altbench.train.config import Config, ConfigError, DataConfig, TrainConfig

# ----------------------------------------------------------------------------- energy ledger


def test_integrate_power_matches_closed_forms():
  t = np.linspace(0.0, 10.0, 11)
  assert ledger.integrate_power(t, 3.0 + 2.0 * t) == pytest.approx(3.0 * 10 + 10.0 ** 2)  # linear: exact
  t = np.sort(np.random.default_rng(0).uniform(0, 2, 4001))  # uneven samples of P(t) = 100 + 50 sin(t)
  exact = 100 * (t[-1] - t[0]) - 50 * (np.cos(t[-1]) - np.cos(t[0]))
  assert ledger.integrate_power(t, 100 + 50 * np.sin(t)) == pytest.approx(exact, rel=1e-6)
  assert ledger.integrate_power([0.0, 1.0], [10.0, 20.0]) == 15.0  # a trapezoid, not a left/right sum
  with pytest.raises(ValueError, match="must not decrease"):
    ledger.integrate_power([1.0, 0.0], [1.0, 1.0])


def test_power_trace_and_labels(tmp_path):
  with ledger.PowerTrace(read=lambda: 50.0, interval_s=0.01) as trace:
    jnp.ones(8).block_until_ready()
    time.sleep(0.05)
  assert len(trace.t_s) >= 3 and trace.joules() == pytest.approx(50.0 * (trace.t_s[-1] - trace.t_s[0]))
  meter = metrics.EnergyMeter(power_w=40.0, rapl_root=str(tmp_path))  # no RAPL zones: an estimate
  assert ledger.energy_label(meter.source) == "estimated" and "40 W" in meter.source
  assert ledger.energy_label("measured (NVML)") == "measured"
  with pytest.raises(ValueError, match="energy source"):
    ledger.energy_label("about 3 J")


# ----------------------------------------------------------------------------- a tiny arena


def _reach_config():
  data = DataConfig(dataset="reach", task_mode="cot", task_size=8, task_depth=2, seq_len=64, eval_examples=8)
  return Config(family="coconut", model=coconut.Config(pattern="A", d_model=32, n_heads=2),
                data=data, train=TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=1, samples=0))


def _recurrent_config():
  model = recurrent.Config(pattern="AAA", d_model=32, n_heads=2, mean_iters=1.5, max_iters=3, backprop_iters=1,
                           test_iters=2)
  return dataclasses.replace(_reach_config(), family="recurrent", model=model)


def _text_config():
  return replace(tiny_config(), model={"pattern": "A"})


def _broken(_):
  raise ImportError("archs.fancy needs a package that is not installed")


def _tiny_arena():
  entries = (arena.Entry("tf", "text", "lm", lambda _: _text_config()),
             arena.Entry("ghost", "text", "no-such-family", lambda _: _text_config()),
             arena.Entry("broken", "text", "lm", _broken),
             arena.Entry("reach-rec", "reach", "recurrent", lambda _: _recurrent_config()))
  groups = (arena.Group("text", "bpb", arena.flops_per_step(_text_config()) * 20.4),
            arena.Group("reach", "accuracy", arena.flops_per_step(_recurrent_config()) * 12))
  return arena.Arena("tiny", groups, entries, evals=2, decode_tokens=4, decode_prompts=2, reasoning_examples=4,
                     recurrences=(1, 2))  # decode_contexts (the bench's decode timing) is left to the smoke run


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """One persistent XLA cache for this module: the second arena run compiles nothing (the first does)."""
  from jax._src import compilation_cache
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  yield
  jax.config.update("jax_compilation_cache_dir", before)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, compile_cache):
  workdir = str(tmp_path_factory.mktemp("arena") / "a")
  return workdir, arena.run(_tiny_arena(), workdir, log=lambda *_: None)


def test_fit_budget_sets_steps_from_flops():
  base = _text_config()
  wide = replace(base, model={"d_model": 64})
  budget = arena.flops_per_step(base) * 100
  assert arena.fit_budget(base, budget).train.steps == 100
  steps = arena.fit_budget(wide, budget).train.steps
  assert steps == round(budget / arena.flops_per_step(wide)) and steps < 100
  per_token = archs.get_family("lm").flops_per_token(dataclasses.replace(base.model, vocab_size=256 + 6), 16)
  assert arena.flops_per_step(base) == 4 * 16 * per_token  # batch 4 x 16 tokens; 256 bytes + 6 special ids


def test_every_entry_trains_to_the_budget(first_run):
  workdir, board = first_run
  for group in board["groups"]:
    done = [r for r in group["rows"] if r["status"] == "done"]
    assert done
    for row in done:
      final = [l for l in metrics.read_jsonl(os.path.join(workdir, row["name"], "metrics.jsonl")) if l.get("final")]
      assert final[-1]["flops"] == row["flops"]
      assert abs(row["flops"] / group["budget_flops"] - 1) < 0.05, row  # steps are rounded: >= 10 steps here
      assert 0.8 < row["xla_vs_analytic"] < 1.6, row  # tiny widths: elementwise work is a larger share
      assert row["energy"] == ledger.energy_label(row["energy_source"])
      assert row["energy_kwh"] == pytest.approx(row["energy_j"] / 3.6e6) and row["step_memory_bytes"] > 0
  rec = board["groups"][1]["rows"][0]
  assert 0.0 <= rec["gen_acc"] <= 1.0 and rec["test_flops_per_answer"] > 0 and "eval_exact" in rec
  assert rec["chance_acc"] == 0.5 and 0.0 <= rec["gen_valid"] <= 1.0  # reach: two candidates per question
  (r1, flops1, _), (r2, flops2, acc2) = rec["recurrence_sweep"]
  assert (r1, r2) == (1, 2) and flops1 < flops2 == rec["test_flops_per_answer"] and acc2 == rec["gen_acc"]
  for name in ("leaderboard.md", "leaderboard.json", "bpb_vs_flops.png", "bpb_vs_kwh.png",
               "accuracy_vs_test_compute.png"):
    assert os.path.exists(os.path.join(workdir, name)), name


def test_missing_families_are_listed_as_missing(first_run):
  workdir, board = first_run
  rows = {r["name"]: r for r in board["groups"][0]["rows"]}
  assert rows["ghost"]["status"] == "missing" and "not registered" in rows["ghost"]["reason"]
  assert rows["broken"]["status"] == "missing" and "ImportError" in rows["broken"]["reason"]
  assert [r["status"] for r in board["groups"][0]["rows"]] == ["done", "missing", "missing"]  # listed last
  md = open(os.path.join(workdir, "leaderboard.md")).read()
  assert "| ghost | no-such-family | **missing**" in md and "| broken | lm | **missing**" in md
  assert not os.path.exists(os.path.join(workdir, "ghost"))


def test_diverged_entry_is_listed_as_failed(tmp_path, monkeypatch):
  seen = []

  def diverge(cfg, run_dir, log=print):
    seen.append(cfg.train.power_w)
    raise loop.NonFiniteLoss("step 3: loss is nan")
  monkeypatch.setattr(loop, "train", diverge)
  spec = arena.Arena("f", (arena.Group("text", "bpb", 1e6),), (arena.Entry("tf", "text", "lm", lambda _: _text_config()),),
                     power_w=12.5)
  board = arena.run(spec, str(tmp_path), log=lambda *_: None)
  assert seen == [12.5]  # the stated power reaches every entry's energy estimate
  row = board["groups"][0]["rows"][0]
  assert row["status"] == "failed" and "loss is nan" in row["reason"]
  assert "| tf | lm | **failed**: step 3: loss is nan" in open(tmp_path / "leaderboard.md").read()
  assert not os.path.exists(tmp_path / "tf" / arena.RESULT)  # retried by the next run


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, compile_cache):
  """The same arena in a second directory, killed (KeyboardInterrupt) when its second entry starts, then rerun."""
  workdir = str(tmp_path_factory.mktemp("arena") / "c")
  real_train, calls = loop.train, []

  def train(cfg, run_dir, log=print):
    calls.append(os.path.basename(run_dir))
    if len(calls) == 2 and not killed:
      killed.append(True)
      raise KeyboardInterrupt
    return real_train(cfg, run_dir, log=log)

  killed, first = [], os.path.join(workdir, "tf")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, "train", train)
    with pytest.raises(KeyboardInterrupt):
      arena.run(_tiny_arena(), workdir, log=lambda *_: None)
    before = {f: (os.stat(os.path.join(first, f)).st_mtime_ns, open(os.path.join(first, f), "rb").read())
              for f in ("metrics.jsonl", arena.RESULT)}
    killed_calls, leaderboard_after_kill = list(calls), os.path.exists(os.path.join(workdir, "leaderboard.json"))
    calls.clear()
    board = arena.run(_tiny_arena(), workdir, log=lambda *_: None)
  after = {f: (os.stat(os.path.join(first, f)).st_mtime_ns, open(os.path.join(first, f), "rb").read())
           for f in ("metrics.jsonl", arena.RESULT)}
  return dict(board=board, workdir=workdir, killed_calls=killed_calls, calls=list(calls), before=before, after=after,
              leaderboard_after_kill=leaderboard_after_kill)


def test_killed_arena_resumes_without_retraining(resumed_run):
  r = resumed_run
  assert r["killed_calls"] == ["tf", "reach-rec"] and not r["leaderboard_after_kill"]
  assert r["calls"] == ["reach-rec"]  # the finished entry is not trained again
  assert r["after"] == r["before"]  # its metrics and result files are untouched (bytes and mtime)
  other = _tiny_arena()
  other = dataclasses.replace(other, groups=(dataclasses.replace(other.groups[0], budget_flops=1e9), other.groups[1]))
  with pytest.raises(ConfigError, match=r"holds results of \['tf'\] at another budget"):
    arena.run(other, r["workdir"], log=lambda *_: None)


def test_same_seed_same_leaderboard(first_run, resumed_run):
  # Everything but time, energy and decode speed is bitwise equal (floats compared with ==).
  assert leaderboard.without_timing(resumed_run["board"]) == leaderboard.without_timing(first_run[1])
  saved = json.load(open(os.path.join(first_run[0], "leaderboard.json")))
  assert leaderboard.without_timing(saved) == json.loads(json.dumps(leaderboard.without_timing(first_run[1])))


def test_cli_refuses_a_bad_arena(tmp_path, capsys):
  from altbench import cli
  assert cli.main(["arena", os.path.join(ROOT, "experiments", "arena.py") + ":tiny"]) == 2
  assert "variant 'tiny' is unknown; valid: ['', 'cpu', 'gpu', 'gpu-short', 'smoke']" in capsys.readouterr().err
  assert cli.main(["arena", str(tmp_path / "none.py")]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_gpu_arena_computes_in_bf16_and_cpu_in_f32(tmp_path):
  # On a GPU impl="auto" takes the Pallas kernels only for 16-bit activations: every gpu entry must compute in
  # bf16 (its weights in float32), the CPU arenas in float32.
  from altbench.train.config import load_module
  experiment = load_module(os.path.join(ROOT, "experiments", "arena.py"))
  for variant, dtype in (("gpu", "bfloat16"), ("gpu-short", "bfloat16"), ("cpu", "float32")):
    entries = [e for e in experiment.get_arena(variant).entries if e.name != "blt-entropy"]  # needs a trained model
    assert len(entries) >= 10
    for e in entries:
      model = e.build(str(tmp_path)).model
      assert (model.dtype, model.param_dtype) == (dtype, "float32"), (variant, e.name)


# ----------------------------------------------------------------------------- analytic FLOPs vs XLA

# lm, megabyte and blt are checked in their own test files; the cases below cover the rest of the registry.
WIDE = dict(d_model=128, n_heads=2, vocab_size=262)


def _text_batch(b, l):
  x = jax.random.randint(jax.random.key(0), (1, b, l), 0, 256)
  return {"inputs": x, "targets": x, "segment_ids": jnp.zeros_like(x), "loss_mask": jnp.ones_like(x),
          "nbytes": jnp.ones_like(x)}


def _reach_batch(b, l, mode):
  data = DataConfig(dataset="reach", task_mode=mode, task_size=8, task_depth=2, seq_len=l, eval_examples=1)
  return {k: jnp.asarray(v)[None] for k, v in rt.ReasoningCorpus(data).train_batch(0, 0, b, l).items()}, data


@functools.cache
def _cases():
  """family -> (model cfg, batch, seq_len, tolerance on XLA / analytic - 1)."""
  lay = rt.layout(_reach_batch(1, 64, "coconut")[1])
  byte_parts = dict(vocab_size=262, d_model=256, n_heads=4, pattern="AA", d_local=128, local_heads=4)
  return {
      # Matmuls dominate: XLA's count adds the elementwise work (softmax, norms, the masking of the NELBO).
      "lm": (lm.Config(pattern="AA", vocab_size=262, d_model=256, n_heads=4), _text_batch(4, 128), 128, 0.1),
      # the SSD's chunk-local quadratic form and the elementwise work around it: within 25%
      "lm-mamba": (lm.Config(pattern="MM", vocab_size=262, d_model=256, n_heads=4, d_state=64, ssm_headdim=64,
                             chunk_size=64, mlp=False), _text_batch(2, 256), 256, 0.25),
      # Gated DeltaNet: projections, the chunk-local products and the triangular inverse (measured 1.002)
      "lm-gdn": (lm.Config(pattern="GG", vocab_size=262, d_model=256, n_heads=4, chunk_size=64, mlp=False),
                 _text_batch(2, 128), 128, 0.1),
      "megabyte": (megabyte.Config(**byte_parts, local_pattern="AA", patch_size=8), _text_batch(2, 128), 128, 0.1),
      "blt": (blt.Config(**byte_parts, encoder_pattern="A", decoder_pattern="AA", patcher="space", min_mean_patch=4,
                         hash_buckets=256), _text_batch(2, 128), 128, 0.1),
      "diffusion": (diffusion.Config(pattern="A", **WIDE, mask_id=258, eos_id=256), _text_batch(2, 128), 128, 0.1),
      "diffusion-bd3": (diffusion.Config(pattern="A", **WIDE, mask_id=258, eos_id=256, block_size=16), _text_batch(2, 128),
                        128, 0.1),
      # k + 1 passes (cached prefix + k decode positions + one full pass); thoughts counted by the analytic formula
      "coconut": (coconut.Config(pattern="A", **WIDE, thoughts=lay.max_stage, prefix_len=lay.prefix_len,
                                 **rt.SPECIAL_IDS), _reach_batch(4, 64, "coconut")[0], 64, 0.1),
      # XLA's cost analysis counts a loop body once, whatever its trip count: checked at r = k = 1 (one scan
      # iteration, no free iterations), where the formula is prelude + core + adapter + coda + head.
      "recurrent": (recurrent.Config(pattern="AAA", prelude=1, coda=1, **WIDE, mean_iters=1.0, max_iters=1,
                                     backprop_iters=1), _text_batch(2, 128), 128, 0.1),
  }


def test_every_registered_family_has_a_flops_check():
  covered = {name.split("-")[0] for name in _cases()}
  assert covered == set(archs.FAMILIES), f"add a FLOPs case for {sorted(set(archs.FAMILIES) - covered)}"


@pytest.mark.parametrize("case", ["lm", "lm-mamba", "lm-gdn", "diffusion", "diffusion-bd3", "coconut", "recurrent",
                                  pytest.param("megabyte", marks=pytest.mark.slow),
                                  pytest.param("blt", marks=pytest.mark.slow)])
def test_analytic_flops_match_xla_cost_analysis(case):
  from altbench.train import step
  family = archs.get_family(case.split("-")[0])
  cfg, batch, l, tol = _cases()[case]
  tcfg = TrainConfig(steps=10)
  tx = step.make_optimizer(tcfg)
  graphdef, state = step.init_state(family, cfg, tx, 0)
  compiled = jax.jit(step.make_train_step(family, graphdef, tx, tcfg)).lower(state, batch, jax.random.key(0)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = family.flops_per_token(cfg, l) * batch["inputs"].shape[1] * l
  assert abs(cost["flops"] / analytic - 1) < tol, (cost["flops"], analytic, cost["flops"] / analytic)


def test_seeds_give_means_intervals_and_paired_differences(tmp_path, compile_cache):
  entries = (arena.Entry("one", "text", "lm", lambda _: _text_config()),
             arena.Entry("two", "text", "lm", lambda _: replace(_text_config(), model={"pattern": "AA"})))
  groups = (arena.Group("text", "bpb", arena.flops_per_step(_text_config()) * 6),)
  spec = arena.Arena("seeds", groups, entries, evals=1, decode_tokens=0, xla_check=False, seeds=2)
  board = arena.run(spec, str(tmp_path), log=lambda *_: None)
  rows = {r["name"]: r for r in board["groups"][0]["rows"]}
  per_seed = {}
  for name in rows:
    dirs = [name, f"{name}.seed1"]
    results = [json.load(open(tmp_path / d / arena.RESULT)) for d in dirs]
    assert [json.load(open(tmp_path / d / "config.json"))["config"]["train"]["seed"] for d in dirs] == [0, 1]
    per_seed[name] = [r["eval_bpb"] for r in results]
    assert len(set(per_seed[name])) == 2  # the seed changes initialisation and data order
    assert rows[name]["seed_scores"] == per_seed[name]
    x = np.array(per_seed[name])
    half = 12.706204736174707 * x.std(ddof=1) / np.sqrt(2)  # t(0.975, 1 degree of freedom)
    assert rows[name]["eval_bpb"] == pytest.approx(x.mean())
    assert (rows[name]["eval_bpb_ci_low"], rows[name]["eval_bpb_ci_high"]) == pytest.approx((x.mean() - half,
                                                                                             x.mean() + half))
  first, second = board["groups"][0]["rows"]
  d = np.subtract(per_seed[second["name"]], per_seed[first["name"]])
  half = 12.706204736174707 * d.std(ddof=1) / np.sqrt(2)
  assert second["vs_above"]["mean"] == pytest.approx(d.mean()) and "vs_above" not in first
  assert second["vs_above"]["significant"] == (abs(d.mean()) > half)
  assert "95% CI] of 2 seeds" in leaderboard.markdown(board)
