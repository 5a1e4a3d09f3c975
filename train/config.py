"""Run configuration: frozen dataclasses, experiments as Python files, typed --set overrides.

An experiment is a file `experiments/<name>.py` with `get_config(variant="") -> Config`. Overrides
like `model.d_model=128` are parsed by the field's declared type; a wrong name or value raises
ConfigError naming the field, the value and what would be valid, before anything is written.
"""

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import typing
from typing import Any

from altbench import archs


class ConfigError(ValueError):
  """A bad experiment path, variant, override or field value."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "pystdlib"    # "pystdlib" (the stdlib's source), "text:PATH" (file or folder), "tokens:DIR"
  #                              (shards of `altbench prepare`), or a task: "mqar"
  tokenizer: str = "bytes"     # "bytes" (256 byte ids + specials) or "bpe" (trained on the train split)
  bpe_vocab_size: int = 4096
  seq_len: int = 256
  heldout_fraction: float = 0.02  # of files (hash split); of the tail of a single text file
  eval_bytes: int = 131072     # held-out bytes every eval scores, identical for every tokenizer
  task_pairs: int = 16         # generated tasks: key-value pairs per example (mqar)
  task_hops: int = 16          # phop: hops p from the last letter (train/tasks.py)
  eval_examples: int = 512     # generated tasks: held-out examples scored by eval
  # Reasoning tasks (train/reasoning_tasks.py: reach, mult, vartrack, countdown); ignored by other datasets
  task_mode: str = "cot"       # nocot | cot | pause | filler | coconut (continuous thoughts)
  task_size: int = 0           # reach nodes / mult digits / vartrack variables / countdown numbers (0: default)
  task_depth: int = 0          # reach path / vartrack chain (at most) / countdown numbers used (0: default)
  task_cot: str = ""           # the CoT's form: "" the task's own; reach also "frontier" (BFS layers, one per step)
  task_pause: int = 8          # pause mode: <pause> tokens before the answer
  task_thoughts: int = 1       # coconut: continuous thoughts per replaced CoT step (c)
  task_max_stage: int = 0      # coconut: the stage from which every step is latent (0: the task's most steps)
  task_stage: int = -1         # coconut: a fixed stage; -1: task_stage_steps steps per stage (the final stage if 0)
  task_stage_steps: int = 0    # coconut curriculum: training steps per stage
  task_hack_fraction: float = 0.0  # SFT rows that show the planted reward hack "#skip" on a hard problem
  #                                  (train/rewards.py); 0: none
  task_hack_said: float = 0.5  # of those rows, the share whose chain says the hack in words (the rest do not)


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
  objective: str = "supervised"  # "supervised" (the family's loss on the corpus' batches) or "grpo" (RL on a
                               # reasoning task's checker, the rl section; train/grpo.py)


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """GRPO (train.objective="grpo", train/grpo.py). A step's rollout batch is train.batch_size rows: batch_size /
  group_size prompts, each sampled group_size times; train.lr, warmup_steps etc. schedule the optimizer over
  steps * updates updates; the reference policy is train.init_from's parameters (or the SFT stage's)."""
  group_size: int = 8          # G: completions per prompt
  epsilon: float = 0.2         # clip the importance ratio to [1 - epsilon, 1 + epsilon]
  beta: float = 0.04           # weight of the k3 KL to the frozen reference; 0 turns it off
  updates: int = 1             # optimizer updates per rollout batch (GRPO's mu)
  temperature: float = 1.0     # sampling temperature of rollouts (log-probs are of softmax(logits / temperature))
  max_new_tokens: int = 0      # completion length; 0: the task's longest body and answer (layout tail_len + 2)
  dr_grpo: bool = False        # Dr.GRPO: advantages not divided by the group's std, loss / (rows * max_new_tokens)
  checker: str = "true"        # the reward: "true" (exact checker) or "buggy" (train/rewards.py's planted bug)
  iters: int = 0               # recurrent depth: test-time r of rollouts and log-probs (0: model.test_iters)
  eval_problems: int = 64      # eval pass@1: eval problems sampled ...
  eval_samples: int = 4        # ... this many times each, at temperature
  sft_steps: int = 0           # > 0: first train the same model supervised for sft_steps steps in WORKDIR/sft (a
                               # run directory of its own) and start from it (train.init_from must be empty)
  sft_lr: float = 3e-3         # the SFT stage's peak lr; it has train's seed, a 5% warmup, a cosine to 10% of
                               # sft_lr, and evals and checkpoints at every quarter (train/loop.py)
  sft_batch_size: int = 0      # the SFT stage's batch size (0: train.batch_size)


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
  rl: RLConfig = RLConfig()


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


# The allowed values of every numeric field of the data, train and mesh sections (model fields are checked by
# each family's Config.validate): (field, rule, what the bounds mean, when the rule applies). A rule is ">= a",
# "> a", an interval "[a, b)" / "(a, b]" / ..., or alternatives joined by " or " (a bare number allows that
# value). tests/test_config.py checks that every numeric field has a rule.
RANGES = [
    ("data.bpe_vocab_size", "> 262", "the 256 bytes and the special tokens, then merges",
     lambda cfg: cfg.data.tokenizer == "bpe"),
    ("data.seq_len", ">= 1", "", None),
    ("data.heldout_fraction", "(0, 1)", "the held-out share of the text", None),
    ("data.eval_bytes", ">= 1", "", None),
    ("data.task_pairs", ">= 1", "", None),
    ("data.task_pairs", "[1, 128]", "mqar keys are distinct byte ids 0..127", lambda cfg: cfg.data.dataset == "mqar"),
    ("data.task_hops", ">= 1", "phop: hops from the last letter", None),
    ("data.eval_examples", ">= 1", "", None),
    ("data.task_size", ">= 0", "0: the task's default", None),
    ("data.task_depth", ">= 0", "0: the task's default", None),
    ("data.task_pause", ">= 0", "", None),
    ("data.task_thoughts", ">= 0", "", None),
    ("data.task_max_stage", ">= 0", "0: the task's most steps", None),
    ("data.task_stage", ">= -1", "-1: data.task_stage_steps steps per stage", None),
    ("data.task_stage_steps", ">= 0", "", None),
    ("data.task_hack_fraction", "[0, 1]", "the share of training rows that show the planted hack", None),
    ("data.task_hack_said", "[0, 1]", "the share of hack chains that say the hack in words", None),
    ("train.steps", ">= 1", "", None),
    ("train.batch_size", ">= 1", "", None),
    ("train.grad_accum", ">= 1", "", None),
    ("train.lr", "> 0", "", None),
    ("train.warmup_steps", ">= 0", "", None),
    ("train.min_lr_ratio", "[0, 1]", "the cosine ends at lr * min_lr_ratio", None),
    ("train.weight_decay", ">= 0", "", None),
    ("train.b1", "[0, 1)", "", None),
    ("train.b2", "[0, 1)", "", None),
    ("train.grad_clip", ">= 0", "0 turns clipping off", None),
    ("train.seed", ">= 0", "", None),
    ("train.log_every", ">= 1", "", None),
    ("train.eval_every", ">= 0", "0: only the final eval", None),
    ("train.ckpt_every", ">= 0", "0: only the final checkpoint", None),
    ("train.keep_checkpoints", ">= 1", "", None),
    ("train.eval_repeats", ">= 1", "", None),
    ("train.samples", ">= 0", "0 turns samples off", None),
    ("train.sample_len", ">= 1", "tokens per sample; train.samples=0 turns samples off",
     lambda cfg: cfg.train.samples > 0),
    ("train.power_w", ">= 0", "0 picks a per-backend default", None),
    ("mesh.data", "-1 or >= 1", "-1 takes every device mesh.fsdp does not use", None),
    ("mesh.fsdp", ">= 1", "", None),
    ("rl.group_size", ">= 2", "advantages compare completions within a group", None),
    ("rl.epsilon", "> 0", "", None),
    ("rl.beta", ">= 0", "0 turns the KL term off", None),
    ("rl.updates", ">= 1", "", None),
    ("rl.temperature", "> 0", "log-probs are of softmax(logits / temperature)", None),
    ("rl.max_new_tokens", ">= 0", "0: the task's longest completion", None),
    ("rl.iters", ">= 0", "0: model.test_iters", None),
    ("rl.eval_problems", ">= 1", "", None),
    ("rl.eval_samples", ">= 1", "", None),
    ("rl.sft_steps", ">= 0", "0: no SFT stage", None),
    ("rl.sft_lr", "> 0", "", None),
    ("rl.sft_batch_size", ">= 0", "0: train.batch_size", None),
]


def _allows(rule, value):
  """Whether value satisfies a RANGES rule."""
  for part in rule.split(" or "):
    if part.startswith(">="):
      ok = value >= float(part[2:])
    elif part.startswith(">"):
      ok = value > float(part[1:])
    elif part[0] in "[(":
      lo, hi = (float(x) for x in part[1:-1].split(","))
      ok = (value >= lo if part[0] == "[" else value > lo) and (value <= hi if part[-1] == "]" else value < hi)
    else:
      ok = value == float(part)
    if ok:
      return True
  return False


def _check_range(cfg, name, rule, note):
  section, field = name.split(".")
  obj = getattr(cfg, section)
  value, typ = getattr(obj, field), typing.get_type_hints(type(obj))[field]
  numeric = (int,) if typ is int else (int, float)
  if isinstance(value, bool) or not isinstance(value, numeric):
    raise ConfigError(f"{name}={value!r}: expected a value of type {typ.__name__}")
  if not math.isfinite(value):
    raise ConfigError(f"{name}={value}: must be a finite number")
  if not _allows(rule, value):
    where = "in " if rule[0] in "[(" else ""
    raise ConfigError(f"{name}={value}: must be {where}{rule}" + (f" ({note})" if note else ""))


def validate(cfg):
  """Raise ConfigError for the first bad value; returns cfg unchanged."""
  if cfg.family not in archs.FAMILIES:
    raise ConfigError(f"family={cfg.family!r}: valid: {sorted(archs.FAMILIES)}")
  if not isinstance(cfg.model, archs.get_family(cfg.family).Config):
    raise ConfigError(f"model: {type(cfg.model).__name__} is not the Config of family {cfg.family!r}")
  for name, rule, note, when in RANGES:
    if when is None or when(cfg):
      _check_range(cfg, name, rule, note)
  from altbench.train import reasoning_tasks
  layout = None
  if cfg.data.dataset in reasoning_tasks.TASKS:
    try:
      layout = reasoning_tasks.layout(cfg.data)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  try:
    cfg.model.validate()
    check_data = getattr(archs.get_family(cfg.family), "check_data", None)  # a family's needs of the data layout
    if check_data is not None:
      check_data(cfg.model, layout)  # resolved here: archs never import train
  except ValueError as e:
    raise ConfigError(f"model.{e}") from None
  d, t = cfg.data, cfg.train
  if d.tokenizer not in ("bytes", "bpe"):
    raise ConfigError(f"data.tokenizer={d.tokenizer!r}: valid: ['bpe', 'bytes']")
  from altbench.train.tasks import TASKS
  if d.dataset != "pystdlib" and not d.dataset.startswith(("text:", "tokens:")) and d.dataset not in TASKS:
    raise ConfigError(f"data.dataset={d.dataset!r}: valid: 'pystdlib', 'text:PATH', 'tokens:DIR' or a task "
                      f"{sorted(TASKS)}")
  if d.dataset.startswith("tokens:"):
    folder = d.dataset[len("tokens:"):]
    if not os.path.isdir(folder):
      raise ConfigError(f"data.dataset={d.dataset!r}: folder {folder!r} does not exist (make it with "
                        "`altbench prepare SRC --out DIR`)")
    if not os.path.exists(os.path.join(folder, "manifest.json")):
      unfinished = os.path.exists(os.path.join(folder, "progress.json"))
      raise ConfigError(f"data.dataset={d.dataset!r}: {os.path.join(folder, 'manifest.json')} does not exist ("
                        + ("prepare did not finish: rerun it to resume)" if unfinished else "not a folder `altbench "
                           "prepare` wrote)"))
  if d.dataset == "mqar" and d.seq_len < 4 * d.task_pairs:
    raise ConfigError(f"data.seq_len={d.seq_len}: {d.dataset} with data.task_pairs={d.task_pairs} needs at least "
                      f"{4 * d.task_pairs}")
  if t.batch_size % t.grad_accum:
    raise ConfigError(f"train.grad_accum={t.grad_accum}: must divide train.batch_size={t.batch_size}")
  if t.objective not in OBJECTIVES:
    raise ConfigError(f"train.objective={t.objective!r}: valid: {list(OBJECTIVES)}")
  if t.objective == "grpo":
    _validate_grpo(cfg, layout)
  return cfg


OBJECTIVES = ("supervised", "grpo")


def _validate_grpo(cfg, layout):
  """GRPO's needs: a reasoning task (its checker), a family with per-token log-probs, rows in whole groups."""
  from altbench.train import grpo, reasoning_tasks, rewards
  rl, t = cfg.rl, cfg.train
  if layout is None:
    raise ConfigError(f"train.objective='grpo': data.dataset={cfg.data.dataset!r} has no checker; use a reasoning "
                      f"task {sorted(reasoning_tasks.TASKS)}")
  if cfg.family not in grpo.FAMILIES:
    raise ConfigError(f"train.objective='grpo': family={cfg.family!r} has no per-token log-probs of a sample; "
                      f"valid: {list(grpo.FAMILIES)} (train/grpo.py says why)")
  if cfg.family == "recurrent" and cfg.model.exit_kl > 0:
    raise ConfigError(f"model.exit_kl={cfg.model.exit_kl}: GRPO scores rollouts at a fixed r (rl.iters); use 0")
  if rl.checker not in rewards.CHECKERS:
    raise ConfigError(f"rl.checker={rl.checker!r}: valid: {list(rewards.CHECKERS)}")
  if t.batch_size % rl.group_size:
    raise ConfigError(f"rl.group_size={rl.group_size}: must divide train.batch_size={t.batch_size} (the rollout "
                      "rows: batch_size / group_size prompts per step)")
  if rl.sft_steps and rl.sft_batch_size % t.grad_accum:
    raise ConfigError(f"rl.sft_batch_size={rl.sft_batch_size}: train.grad_accum={t.grad_accum} must divide it")
  if rl.sft_steps and t.init_from:
    raise ConfigError(f"rl.sft_steps={rl.sft_steps}: the SFT stage is the start; leave train.init_from empty "
                      f"(it is {t.init_from!r})")


def to_dict(cfg):
  return dataclasses.asdict(cfg)


def from_dict(d):
  """Inverse of to_dict, for config.json of a run directory."""
  family = archs.get_family(d["family"])
  known = lambda cls, values: cls(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls)}})
  return Config(family=d["family"], model=known(family.Config, d["model"]), data=known(DataConfig, d["data"]),
                train=known(TrainConfig, d["train"]), mesh=known(MeshConfig, d["mesh"]),
                rl=known(RLConfig, d.get("rl", {})))


def read_run_config(run_dir):
  """The config dict (to_dict's form) a run directory's config.json holds; the one reader of that file.

  FileNotFoundError without a config.json; ConfigError naming the file when it is not one altbench wrote
  (unreadable JSON, another program's config such as a Hugging Face model's, an unknown family).
  """
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path} is not an altbench run's config: not valid JSON ({e})") from None
  cfg = saved.get("config") if isinstance(saved, dict) else None
  sections = ("model", "data", "train", "mesh")
  if not isinstance(cfg, dict) or not isinstance(cfg.get("family"), str) or not all(
      isinstance(cfg.get(k), dict) for k in sections):
    found = f"keys {sorted(saved)[:6]}" if isinstance(saved, dict) else f"a JSON {type(saved).__name__}"
    hint = ""
    if isinstance(saved, dict) and ("architectures" in saved or "model_type" in saved):
      hint = f"; it looks like a Hugging Face model's: import it with `altbench convert-hf {run_dir} --out RUN`"
    expected = '{"config": {"family", "model", "data", "train", "mesh"}, ...}'
    raise ConfigError(f"{path} is not an altbench run's config (expected {expected}, found {found}){hint}")
  if cfg["family"] not in archs.FAMILIES:
    raise ConfigError(f"{path}: family={cfg['family']!r} is not registered; valid: {sorted(archs.FAMILIES)}")
  return cfg


# Fields that may differ when a run directory is resumed: they change when things are logged or saved,
# not what is computed.
RESUMABLE_CHANGES = {"train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_checkpoints",
                     "train.samples", "train.sample_len", "train.power_w", "train.eval_repeats",
                     "rl.eval_problems", "rl.eval_samples"}


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
