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
