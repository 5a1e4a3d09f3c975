"""Config overrides: typed parsing, errors that name the field, nothing written on a bad config."""

import os
import subprocess
import sys

import pytest

from altbench.train import config
from altbench.train.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "experiments", "transformer.py")


def test_overrides_are_typed():
  cfg = config.apply_overrides(config.load_experiment(EXP + ":smoke"),
                               ["model.d_model=64", "train.lr=0.01", "model.tie_embeddings=true", "data.tokenizer=bpe"])
  assert (cfg.model.d_model, cfg.train.lr, cfg.model.tie_embeddings, cfg.data.tokenizer) == (64, 0.01, True, "bpe")
  assert isinstance(cfg.train.lr, float) and isinstance(cfg.model.d_model, int)


@pytest.mark.parametrize("override,needle", [
    ("model.d_modle=64", "did you mean 'd_model'"),
    ("model.d_model=abc", "model.d_model='abc': expected a value of type int"),
    ("train.steps=1.5", "train.steps='1.5'"),
    ("trian.steps=3", "unknown field 'trian'"),
    ("model=3", "'model' is a section"),
    ("family=mamba9", "family='mamba9'"),
    ("steps", "must look like section.field=value"),
])
def test_bad_overrides_name_the_field(override, needle):
  with pytest.raises(ConfigError, match=None) as e:
    config.apply_overrides(config.load_experiment(EXP), [override])
  assert needle in str(e.value)


@pytest.mark.parametrize("override,needle", [
    ("model.n_kv_heads=3", "model.n_kv_heads=3: must divide n_heads=4"),
    ("model.pattern=AXA", "model.pattern='AXA'"),
    ("data.tokenizer=wordpiece", "data.tokenizer='wordpiece': valid"),
    ("train.grad_accum=3", "train.grad_accum=3: must divide train.batch_size=16"),
    ("model.dtype=float16", "model.dtype='float16': valid"),
])
def test_invalid_values_are_reported(override, needle):
  with pytest.raises(ConfigError) as e:
    config.validate(config.apply_overrides(config.load_experiment(EXP), [override]))
  assert needle in str(e.value)


def test_unknown_variant_and_missing_file():
  with pytest.raises(ConfigError, match="variant 'smok' is unknown.*did you mean 'smoke'"):
    config.load_experiment(EXP + ":smok")
  with pytest.raises(ConfigError, match="does not exist"):
    config.load_experiment("experiments/nope.py")


def test_round_trip_through_json_dict():
  cfg = config.load_experiment(EXP + ":smoke")
  assert config.from_dict(config.to_dict(cfg)) == cfg


def test_cli_bad_config_exits_2_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "altbench.cli", "train", EXP + ":smoke", "--workdir", str(workdir),
                         "--set", "model.n_heads=0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 2
  assert "model.n_heads=0" in proc.stderr and "Traceback" not in proc.stderr
  assert not workdir.exists()


def test_every_numeric_field_has_a_range():
  """config.RANGES is the one place numeric fields are checked: a field added without a rule fails here."""
  import dataclasses
  import typing
  numeric = {f"{section}.{f.name}" for section, cls in (("data", config.DataConfig), ("train", config.TrainConfig),
                                                        ("mesh", config.MeshConfig), ("rl", config.RLConfig))
             for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] in (int, float)}
  assert {name for name, *_ in config.RANGES} == numeric
  assert {f.name for f in dataclasses.fields(config.Config)} == {"family", "model", "data", "train", "mesh", "rl"}
  config.validate(config.Config())  # every default is in range


@pytest.mark.parametrize("override,needle", [
    ("train.sample_len=0", "train.sample_len=0: must be >= 1 (tokens per sample; train.samples=0 turns samples off)"),
    ("train.samples=-1", "train.samples=-1: must be >= 0 (0 turns samples off)"),
    ("train.eval_every=-1", "train.eval_every=-1: must be >= 0 (0: only the final eval)"),
    ("train.ckpt_every=-2", "train.ckpt_every=-2: must be >= 0"),
    ("train.lr=0", "train.lr=0.0: must be > 0"),
    ("train.lr=nan", "train.lr=nan: must be a finite number"),
    ("train.b2=1", "train.b2=1.0: must be in [0, 1)"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio=2.0: must be in [0, 1]"),
    ("train.seed=-1", "train.seed=-1: must be >= 0"),
    ("train.grad_accum=0", "train.grad_accum=0: must be >= 1"),
    ("data.heldout_fraction=1", "data.heldout_fraction=1.0: must be in (0, 1)"),
    ("data.task_stage=-2", "data.task_stage=-2: must be >= -1"),
    ("mesh.data=0", "mesh.data=0: must be -1 or >= 1"),
    ("mesh.fsdp=0", "mesh.fsdp=0: must be >= 1"),
])
def test_out_of_range_values_name_the_field_and_range(override, needle):
  with pytest.raises(ConfigError) as e:
    config.validate(config.apply_overrides(config.load_experiment(EXP + ":smoke"), [override]))
  assert str(e.value) == needle or str(e.value).startswith(needle + " (")


@pytest.mark.parametrize("overrides", [["train.samples=0", "train.sample_len=0"], ["mesh.data=-1"],
                                       ["data.task_stage=-1"], ["train.eval_every=0", "train.grad_clip=0"]])
def test_boundary_values_that_mean_off_or_default_are_valid(overrides):
  config.validate(config.apply_overrides(config.load_experiment(EXP + ":smoke"), overrides))


def test_range_rules_apply_only_where_they_matter():
  cfg = config.load_experiment(EXP + ":smoke")
  config.validate(config.apply_overrides(cfg, ["data.bpe_vocab_size=100"]))  # byte tokenizer: unused
  with pytest.raises(ConfigError, match="data.bpe_vocab_size=100: must be > 262"):
    config.validate(config.apply_overrides(cfg, ["data.bpe_vocab_size=100", "data.tokenizer=bpe"]))
  with pytest.raises(ConfigError, match=r"data.task_pairs=200: must be in \[1, 128\]"):
    config.validate(config.apply_overrides(cfg, ["data.dataset=mqar", "data.task_pairs=200", "data.seq_len=1024"]))


def test_python_config_of_the_wrong_type_is_named():
  import dataclasses
  cfg = config.load_experiment(EXP + ":smoke")
  with pytest.raises(ConfigError, match=r"train.steps=1000.0: expected a value of type int"):
    config.validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=1000.0)))


@pytest.mark.parametrize("override", ["train.sample_len=0", "train.samples=-1", "train.eval_every=-1"])
def test_cli_refuses_out_of_range_values_before_training(tmp_path, capsys, override):
  """Found by trying it: sample_len=0 trained to the end, then crashed with an IndexError at sampling."""
  from altbench import cli
  workdir = tmp_path / "run"
  assert cli.main(["train", EXP + ":smoke", "--workdir", str(workdir), "--set", override]) == 2
  err = capsys.readouterr().err
  assert f"altbench: error: {override}: must be >= " in err and len(err.strip().splitlines()) == 1
  assert not workdir.exists()
