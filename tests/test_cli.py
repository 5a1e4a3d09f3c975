"""The CLI around a finished run: eval reproduces the logged bpb, sample keeps the prompt, report plots."""

import os

import pytest

from altbench import cli
from altbench.train import loop, metrics
from altbench.train.config import ConfigError

from conftest import ROOT, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  loop.train(tiny_config(steps=4), workdir, log=lambda *a, **k: None)
  return workdir


def test_eval_reproduces_the_logged_bpb(run_dir, capsys):
  assert cli.main(["eval", run_dir]) == 0
  logged = [l for l in metrics.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if l.get("final")][-1]
  out = capsys.readouterr().out
  assert f"'eval_bpb': {logged['eval_bpb']}" in out


def test_sample_continues_the_prompt(run_dir, capsys):
  assert cli.main(["sample", run_dir, "--prompt", "ROMEO:", "--length", "12", "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("ROMEO:")


def test_report_writes_table_and_plot(run_dir, tmp_path, capsys):
  png = str(tmp_path / "r.png")
  assert cli.main(["report", run_dir, run_dir, "--png", png]) == 0
  table = capsys.readouterr().out
  assert table.count(run_dir) == 2 and "eval bpb" in table
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_run_directory_exits_2(tmp_path, capsys):
  assert cli.main(["eval", str(tmp_path / "nope")]) == 2
  assert "not a run directory" in capsys.readouterr().err


def test_directory_with_another_programs_config_json_exits_2(tmp_path, capsys):
  """Found by trying it: `altbench eval` on a Hugging Face model directory died with KeyError: 'config'."""
  import json
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
  path = str(hf_dir / "config.json")
  smoke = os.path.join(ROOT, "experiments", "transformer.py:smoke")
  for argv in (["eval", str(hf_dir)], ["sample", str(hf_dir)], ["train", smoke, "--workdir", str(hf_dir)]):
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith(f"altbench: error: {path} is not an altbench run's config") and "KeyError" not in err
    assert f"altbench convert-hf {hf_dir} --out RUN" in err and len(err.strip().splitlines()) == 1
  (hf_dir / "config.json").write_text("{not json")
  assert cli.main(["eval", str(hf_dir)]) == 2
  assert f"{path} is not an altbench run's config: not valid JSON" in capsys.readouterr().err
  with pytest.raises(ConfigError, match=r"train.init_from=.*is not an altbench run's config"):
    loop.train(tiny_config(steps=1, init_from=str(hf_dir)), str(tmp_path / "run"), log=lambda *a, **k: None)
  assert not os.path.exists(tmp_path / "run")


def test_sample_refuses_empty_samples(tmp_path, capsys):
  assert cli.main(["sample", str(tmp_path), "--length", "0"]) == 2
  assert "sample --length=0: must be >= 1" in capsys.readouterr().err


def test_bf16_compute_trains(tmp_path):
  from conftest import replace
  cfg = replace(tiny_config(steps=3), model={"dtype": "bfloat16"})
  f32 = loop.train(tiny_config(steps=3), str(tmp_path / "f32"), log=lambda *a, **k: None)
  bf16 = loop.train(cfg, str(tmp_path / "bf16"), log=lambda *a, **k: None)
  assert abs(bf16["eval_bpb"] - f32["eval_bpb"]) < 0.05 * f32["eval_bpb"]


def test_bench_runs_a_benchmark_and_names_unknown_ones(capsys):
  import json
  assert cli.main(["bench", "decode", "--contexts", "8", "24", "--steps", "2", "--repeats", "1", "--d-model", "32",
                   "--models", "transformer"]) == 0
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert {l.get("context") for l in lines if "context" in l} == {8, 24} and lines[-1]["summary"]
  assert cli.main(["bench", "nope"]) == 2
  assert "valid: [" in capsys.readouterr().err


def test_every_bench_script_imports_when_run_by_path():
  """`python experiments/bench/X.py` puts experiments/bench/ first on sys.path, where kernels.py would shadow a
  bare `kernels` package: every script imports altbench.* and runs from any directory (here: /)."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  bench = os.path.join(root, "experiments", "bench")
  scripts = sorted(f for f in os.listdir(bench) if f.endswith(".py"))
  procs = {f: subprocess.Popen([sys.executable, os.path.join(bench, f), "--help"], cwd="/", stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for f in scripts}
  failed = {f: p.communicate(timeout=300)[1][-500:] for f, p in procs.items()}
  failed = {f: err for f, err in failed.items() if procs[f].returncode != 0}
  assert not failed, failed
