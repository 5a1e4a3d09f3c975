"""Run configuration: frozen dataclasses, experiments as Python files, typed --set overrides.

An experiment is a file `experiments/<name>.py` with `get_config(variant="") -> Config`. Overrides
like `model.d_model=128` are parsed by the field's declared type; a wrong name or value raises
ConfigError naming the field, the value and what would be valid, before anything is written.
"""

import dataclasses
import difflib
import importlib.util
import os
import typing
from typing import Any

from altbench import archs


class ConfigError(ValueError):
  """A bad experiment path, variant, override or field value."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "pystdlib"    # "pystdlib" (the stdlib's source), "text:PATH" (file or folder), or a task: "mqar"
  tokenizer: str = "bytes"     # "bytes" (256 byte ids + specials) or "bpe" (trained on the train split)
  bpe_vocab_size: int = 4096
  seq_len: int = 256
  heldout_fraction: float = 0.02  # of files (hash split); of the tail of a single text file
  eval_bytes: int = 131072     # held-out bytes every eval scores, identical for every tokenizer
  task_pairs: int = 16         # generated tasks: key-value pairs per example (mqar)
  eval_examples: int = 512     # generated tasks: held-out examples scored by eval
  # Reasoning tasks (train/reasoning_tasks.py: reach, mult, vartrack); ignored by other datasets
  task_mode: str = "cot"       # nocot | cot | pause | filler | coconut (continuous thoughts)
  task_size: int = 0           # reach nodes / mult digits / vartrack variables (0: the task's default)
  task_depth: int = 0          # reach path length (at most) / vartrack chain length (0: the task's default)
  task_cot: str = ""           # the CoT's form: "" the task's own; reach also "frontier" (BFS layers, one per step)
  task_pause: int = 8          # pause mode: <pause> tokens before the answer
  task_thoughts: int = 1       # coconut: continuous thoughts per replaced CoT step (c)
  task_max_stage: int = 0      # coconut: the stage from which every step is latent (0: the task's most steps)
  task_stage: int = -1         # coconut: a fixed stage; -1: task_stage_steps steps per stage (the final stage if 0)
  task_stage_steps: int = 0    # coconut curriculum: training steps per stage


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 8          # global, in sequences
  grad_accum: int = 1          # micro-batches per step (batch_size must divide evenly)
  lr: float = 1e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1    # cosine decays to lr * min_lr_ratio
  weight_decay: float = 0.1    # on matrices only; vectors (norm scales, SSM A/D/dt) are not decayed
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0       # global-norm clipping; 0 disables
  seed: int = 0
  log_every: int = 10
  eval_every: int = 250        # 0: only at the end
  ckpt_every: int = 250        # 0: only at the end (and on SIGINT/SIGTERM)
  keep_checkpoints: int = 3
  eval_repeats: int = 1        # score the eval set this many times with fresh noise (diffusion: standard error)
  samples: int = 2             # samples printed and saved at the end
  sample_len: int = 200
  power_w: float = 0.0         # stated device power for the energy estimate; 0 picks a per-backend default
  init_from: str = ""          # a run directory whose latest parameters start this run (optimizer and step fresh):
                               # fine-tuning, or Coconut from its CoT model (Hao et al.'s stage 0)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1               # data-parallel axis; -1 takes every device fsdp does not use
  fsdp: int = 1                # parameters and optimizer state sharded over this axis


@dataclasses.dataclass(frozen=True)
class Config:
  family: str = "lm"
  model: Any = dataclasses.field(default_factory=archs.get_family("lm").Config)
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()


def load_module(path):
  """A Python file as a module, by path: experiments and benchmarks are files, not an importable package."""
  name = f"altbench_{os.path.splitext(os.path.basename(path))[0]}_{abs(hash(os.path.abspath(path)))}"
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_experiment(spec):
  """'experiments/x.py[:variant]' -> Config."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"experiment file {path!r} does not exist (expected experiments/<name>.py[:variant])")
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"experiment {path!r} defines no get_config(variant)")
  cfg = module.get_config(variant)
  if not isinstance(cfg, Config):
    raise ConfigError(f"{path}: get_config({variant!r}) returned {type(cfg).__name__}, expected train.config.Config")
  return cfg


def check_variant(variant, variants):
  """For experiments: raise a ConfigError listing the variants when `variant` is unknown."""
  if variant not in variants:
    raise ConfigError(f"variant {variant!r} is unknown; valid: {sorted(variants)}{_suggest(variant, variants)}")


def _suggest(name, choices):
  close = difflib.get_close_matches(name, list(choices), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _parse(text, typ, field_path):
  try:
    if typ is bool:
      if text.lower() in ("true", "1", "yes"):
        return True
      if text.lower() in ("false", "0", "no"):
        return False
      raise ValueError
    if typ is int:
      return int(text)
    if typ is float:
      return float(text)
    if typ is str:
      return text
  except ValueError:
    pass
  name = getattr(typ, "__name__", str(typ))
  raise ConfigError(f"{field_path}={text!r}: expected a value of type {name}")


def _replace_path(obj, keys, text, prefix):
  names = [f.name for f in dataclasses.fields(obj)]
  key = keys[0]
  field_path = f"{prefix}{key}"
  if key not in names:
    raise ConfigError(f"unknown field {field_path!r}; valid fields here: {names}{_suggest(key, names)}")
  if len(keys) > 1:
    child = getattr(obj, key)
    if not dataclasses.is_dataclass(child):
      raise ConfigError(f"{field_path!r} is a value, not a section; set it with {field_path}=...")
    return dataclasses.replace(obj, **{key: _replace_path(child, keys[1:], text, field_path + ".")})
  if dataclasses.is_dataclass(getattr(obj, key)):
    raise ConfigError(f"{field_path!r} is a section; set one of its fields, e.g. {field_path}.<name>=...")
  typ = typing.get_type_hints(type(obj))[key]
  return dataclasses.replace(obj, **{key: _parse(text, typ, field_path)})


def apply_overrides(cfg, overrides):
  """['model.d_model=128', ...] -> a new Config; `family=` first so model fields resolve against it."""
  overrides = list(overrides)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} must look like section.field=value")
  for item in sorted(overrides, key=lambda o: not o.startswith("family=")):
    path, _, text = item.partition("=")
    if path == "family":
      family = archs.get_family(text) if text in archs.FAMILIES else None
      if family is None:
        raise ConfigError(f"family={text!r}: valid: {sorted(archs.FAMILIES)}{_suggest(text, archs.FAMILIES)}")
      cfg = dataclasses.replace(cfg, family=text, model=family.Config())
      continue
    cfg = _replace_path(cfg, path.split("."), text, "")
  return cfg


def validate(cfg):
  """Raise ConfigError for the first bad value; returns cfg unchanged."""
  if cfg.family not in archs.FAMILIES:
    raise ConfigError(f"family={cfg.family!r}: valid: {sorted(archs.FAMILIES)}")
  if not isinstance(cfg.model, archs.get_family(cfg.family).Config):
    raise ConfigError(f"model: {type(cfg.model).__name__} is not the Config of family {cfg.family!r}")
  try:
    cfg.model.validate()
    check_data = getattr(archs.get_family(cfg.family), "check_data", None)  # a family's needs of the data layout
    if check_data is not None:
      check_data(cfg.model, cfg.data)
  except ValueError as e:
    raise ConfigError(f"model.{e}") from None
  d, t = cfg.data, cfg.train
  if d.tokenizer not in ("bytes", "bpe"):
    raise ConfigError(f"data.tokenizer={d.tokenizer!r}: valid: ['bpe', 'bytes']")
  from altbench.train.tasks import TASKS
  if d.dataset != "pystdlib" and not d.dataset.startswith("text:") and d.dataset not in TASKS:
    raise ConfigError(f"data.dataset={d.dataset!r}: valid: 'pystdlib', 'text:PATH' or a task {sorted(TASKS)}")
  if d.dataset == "mqar" and d.seq_len < 4 * d.task_pairs:
    raise ConfigError(f"data.seq_len={d.seq_len}: {d.dataset} with data.task_pairs={d.task_pairs} needs at least "
                      f"{4 * d.task_pairs}")
  if d.dataset == "mqar" and not 1 <= d.task_pairs <= 128:
    raise ConfigError(f"data.task_pairs={d.task_pairs}: valid: 1..128 (keys are distinct byte ids 0..127)")
  from altbench.train import reasoning_tasks
  if d.dataset in reasoning_tasks.TASKS:
    try:
      reasoning_tasks.layout(d)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  if d.tokenizer == "bpe" and d.bpe_vocab_size <= 262:
    raise ConfigError(f"data.bpe_vocab_size={d.bpe_vocab_size}: must exceed the 256 bytes and specials")
  if not 0 < d.heldout_fraction < 1:
    raise ConfigError(f"data.heldout_fraction={d.heldout_fraction}: must be in (0, 1)")
  positive = {"data.seq_len": d.seq_len, "data.eval_bytes": d.eval_bytes, "train.steps": t.steps,
              "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum, "train.lr": t.lr,
              "train.log_every": t.log_every, "train.keep_checkpoints": t.keep_checkpoints,
              "train.eval_repeats": t.eval_repeats}
  for name, value in positive.items():
    if value <= 0:
      raise ConfigError(f"{name}={value}: must be positive")
  if t.batch_size % t.grad_accum:
    raise ConfigError(f"train.grad_accum={t.grad_accum}: must divide train.batch_size={t.batch_size}")
  if cfg.mesh.fsdp < 1 or (cfg.mesh.data < 1 and cfg.mesh.data != -1):
    raise ConfigError(f"mesh: data={cfg.mesh.data}, fsdp={cfg.mesh.fsdp}: use positive sizes (data may be -1)")
  return cfg


def to_dict(cfg):
  return dataclasses.asdict(cfg)


def from_dict(d):
  """Inverse of to_dict, for config.json of a run directory."""
  family = archs.get_family(d["family"])
  known = lambda cls, values: cls(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}})
  return Config(family=d["family"], model=known(family.Config, d["model"]), data=known(DataConfig, d["data"]),
                train=known(TrainConfig, d["train"]), mesh=known(MeshConfig, d["mesh"]))


# Fields that may differ when a run directory is resumed: they change when things are logged or saved,
# not what is computed.
RESUMABLE_CHANGES = {"train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_checkpoints",
                     "train.samples", "train.sample_len", "train.power_w", "train.eval_repeats"}


def diff(a, b, prefix=""):
  """Dotted names of the fields where two config dicts differ."""
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += diff(va, vb, f"{prefix}{key}.")
    elif va != vb:
      out.append(f"{prefix}{key}")
  return out
