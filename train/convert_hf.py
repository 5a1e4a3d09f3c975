"""Import a Hugging Face checkpoint (Llama, Mamba-2, Falcon-H1) as an altbench run directory.

`altbench convert-hf DIR --out RUN` reads DIR/config.json and DIR/*.safetensors (sharded or not), maps the
config onto `archs.lm.Config` ("A" * n for LlamaForCausalLM, "M" * n without MLPs for Mamba2ForCausalLM,
"P" * n for FalconH1ForCausalLM), loads the weights and writes RUN/config.json plus an orbax checkpoint of the
train state at step 0, so `altbench eval|sample RUN` and `train.loop.load_run(RUN)` use it like a trained run
(and `altbench train` on the same config would fine-tune it).

The mapping follows the modeling code of transformers 5.x (models/{llama,mamba2,falcon_h1}/modeling_*.py):

* torch Linear weights (out, in) become flax kernels (in, out); the depthwise conv1d weight (C, 1, K)
  becomes conv_kernel (K, C) (tap i multiplies x[t - (K - 1 - i)] in both).
* Mamba-2: HF gates before its grouped (n_groups) RMSNorm, so norm_before_gate=False; the block norms and
  the gated norm share layer_norm_epsilon; no MLPs. residual_in_fp32 holds because converted runs compute in
  float32 (model.dtype); with --set model.dtype=bfloat16 our residual stream would be bfloat16 too.
* Falcon-H1: every multiplier has a Config field (embedding, lm_head, attention in/out/key, MLP gate/down,
  SSM in/out and the five in_proj "mup vector" segments); mamba_d_ssm sets ssm_inner_dim; mamba_rms_norm
  False drops the gated norm (ssm_norm=False).

Anything the model would compute differently (biases, rope scaling, other activations, a dt clamp, ...)
raises ConversionError naming the field and its value. The weights are stored in model.param_dtype
(float32 unless overridden), whatever the checkpoint's dtype. The model keeps the HF vocabulary; the run's
data section stays the bench's (byte tokenizer by default), so `eval` scores byte ids with a model trained
on another tokenizer: the numbers are well-defined but not comparable to the HF model's own. config.json
says so under "converted_from".
"""

import json
import math
import os
import shutil
import struct

import numpy as np

from altbench.train import config as config_lib

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Mamba2ForCausalLM": "mamba2", "FalconH1ForCausalLM": "falcon_h1"}

# Class defaults of transformers 5.x configs, for keys a config.json leaves out.
HF_DEFAULTS = {
    "llama": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
              "mlp_bias": False, "num_key_value_heads": None, "head_dim": None},
    "mamba2": {"hidden_act": "silu", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False, "expand": 2,
               "conv_kernel": 4, "n_groups": 8, "use_bias": False, "use_conv_bias": True, "chunk_size": 256,
               "time_step_limit": (0.0, math.inf), "residual_in_fp32": True},
    "falcon_h1": {"hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                  "num_key_value_heads": 8, "head_dim": None, "mamba_d_ssm": 1024, "mamba_n_heads": 128,
                  "mamba_d_head": "auto", "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_conv": 4,
                  "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False,
                  "mamba_norm_before_gate": True, "mamba_rms_norm": False, "time_step_limit": (0.0, math.inf),
                  "projectors_bias": False, "attention_bias": False, "mlp_bias": False, "lm_head_multiplier": 1.0,
                  "embedding_multiplier": 1.0, "mlp_multipliers": None, "key_multiplier": 1.0,
                  "attention_out_multiplier": 1.0, "attention_in_multiplier": 1.0, "ssm_multipliers": None,
                  "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0},
}

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class ConversionError(config_lib.ConfigError):
  """An unsupported Hugging Face config field or value, weights that do not fit the config, or a file of the
  Hugging Face directory that cannot be read (malformed or truncated JSON or safetensors)."""


# ----------------------------------------------------------------------------------------------- reading


def _read_json(path, what):
  """A JSON file of the Hugging Face directory; ConversionError naming it when it does not parse."""
  try:
    with open(path) as f:
      return json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConversionError(f"{path}: not valid JSON ({e}); expected {what}") from None


def read_config(hf_dir):
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
  hf = _read_json(path, "a Hugging Face model config (save_pretrained output)")
  if not isinstance(hf, dict):
    raise ConversionError(f"{path}: a JSON {type(hf).__name__}; expected a Hugging Face model config (an object)")
  return hf


def _read_safetensors(path):
  """{name: np.ndarray} of one .safetensors file, memory-mapped; ConversionError naming the file when it is
  malformed or truncated.

  Parsed directly (8-byte little-endian header length, JSON header, raw little-endian data) rather than with
  the safetensors package (checked at 0.8.0): its numpy backend returns bfloat16, the usual dtype of published
  checkpoints, only once ml_dtypes has registered that dtype with numpy, and it copies every tensor into
  memory, where this reader maps the file and copies nothing until a tensor is converted; nor does
  convert-hf then need the package (the `bench` extra).
  """
  import ml_dtypes
  dtypes = {**_SAFETENSORS_DTYPES, "BF16": ml_dtypes.bfloat16}
  file_size = os.path.getsize(path)

  def bad(problem):
    return ConversionError(f"{path}: not a readable safetensors file: {problem} (the file has {file_size} bytes; "
                           "truncated?)")

  if file_size < 8:
    raise bad("shorter than its 8-byte header length")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > file_size - 8:
      raise bad(f"the header length says {n} bytes, {file_size - 8} follow")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise bad(f"the header is not JSON: {e}") from None
  if not isinstance(header, dict):
    raise bad(f"the header is a JSON {type(header).__name__}, expected an object")
  size = file_size - 8 - n
  data = np.memmap(path, np.uint8, "r", offset=8 + n, shape=(size,)) if size else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      raise bad(f"tensor {name}: header entry {info!r}, expected dtype, shape and data_offsets")
    if info["dtype"] not in dtypes:
      raise ConversionError(f"{path}: tensor {name} has dtype {info['dtype']}; supported: {sorted(dtypes)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not _naturals(shape) or not _naturals(offsets) or len(offsets) != 2:
      raise bad(f"tensor {name}: shape {shape!r} and data_offsets {offsets!r}, expected lists of non-negative "
                "integers")
    begin, end = offsets
    nbytes = math.prod(shape) * np.dtype(dtypes[info["dtype"]]).itemsize
    if end - begin != nbytes or end > size:
      raise bad(f"tensor {name}: {info['dtype']} {shape} takes {nbytes} bytes at data_offsets [{begin}, {end}] "
                f"of {size} data bytes")
    out[name] = data[begin:end].view(dtypes[info["dtype"]]).reshape(shape)
  return out


def _naturals(xs):
  """Whether xs is a JSON list of non-negative integers."""
  return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)


def read_weights(hf_dir):
  """{name: np.ndarray} of every tensor in hf_dir's safetensors files (one file or shards with an index)."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    expected = 'a safetensors index ({"weight_map": {tensor: file}})'
    weight_map = _read_json(index, expected)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):
      raise ConversionError(f"{index}: no weight_map; expected {expected}")
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(f"{hf_dir} has no *.safetensors weights (pytorch_model.bin is not read; re-save "
                            "with save_pretrained(..., safe_serialization=True))")
  tensors = {}
  for name in files:
    for key, value in _read_safetensors(os.path.join(hf_dir, name)).items():
      if key in tensors:
        raise ConversionError(f"{hf_dir}: tensor {key} appears in more than one safetensors file")
      tensors[key] = value
  return tensors


# ------------------------------------------------------------------------------------------------ config


class _Fields:
  """Reads an HF config dict with the class defaults; every error names the architecture, field and value."""

  def __init__(self, hf, arch):
    self.hf, self.arch = hf, arch

  def __call__(self, name):
    if name in self.hf:
      return self.hf[name]
    if name in HF_DEFAULTS[self.arch]:
      return HF_DEFAULTS[self.arch][name]
    raise ConversionError(f"{self.arch} config.json has no {name!r} (and transformers has no default for it)")

  def fail(self, name, value, valid):
    raise ConversionError(f"{self.arch} config field {name}={value!r} is not supported; valid: {valid}")

  def require(self, name, valid):
    value = self(name)
    if value not in valid:
      self.fail(name, value, " or ".join(repr(v) for v in valid))
    return value

  def int(self, name):
    value = self(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      self.fail(name, value, "a positive integer")
    return value

  def float(self, name):
    value = _as_float(self(name))
    if value is None or not math.isfinite(value):
      self.fail(name, self(name), "a finite number")
    return value

  def bool(self, name):
    value = self(name)
    if not isinstance(value, bool):
      self.fail(name, value, "true or false")
    return value

  def floats(self, name, n):
    value = self(name)
    value = [1.0] * n if value is None else value  # transformers' default: all ones
    if not isinstance(value, (list, tuple)) or len(value) != n or any(_as_float(v) is None for v in value):
      self.fail(name, value, f"a list of {n} numbers")
    return [_as_float(v) for v in value]


def _as_float(value):
  """A JSON number, or transformers' {"__float__": "Infinity"} / "Infinity" spellings; None if neither."""
  if isinstance(value, dict) and set(value) == {"__float__"}:
    value = value["__float__"]
  if isinstance(value, bool):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _check_rope(f):
  """rope_theta of plain RoPE; anything else (scaling, partial rotary) is refused."""
  params = f.hf.get("rope_parameters")
  if params is not None:
    if not isinstance(params, dict) or "rope_theta" not in params:
      f.fail("rope_parameters", params, "a dict with rope_type 'default' and rope_theta")
    if params.get("rope_type", params.get("type", "default")) != "default":
      f.fail("rope_parameters.rope_type", params.get("rope_type", params.get("type")), "'default' (no rope scaling)")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
    if extra and not (extra == ["partial_rotary_factor"] and _as_float(params["partial_rotary_factor"]) == 1.0):
      f.fail("rope_parameters", params, "only rope_type 'default' and rope_theta")
    theta = _as_float(params["rope_theta"])
  else:
    if f.hf.get("rope_scaling") is not None:
      f.fail("rope_scaling", f.hf["rope_scaling"], "None (plain RoPE)")
    theta = _as_float(f.hf.get("rope_theta", 10000.0))
  if f.hf.get("partial_rotary_factor", 1.0) != 1.0:
    f.fail("partial_rotary_factor", f.hf["partial_rotary_factor"], "1.0")
  if theta is None or not theta > 0:
    f.fail("rope_theta", theta, "a positive number")
  return theta


def _check_dt_limit(f):
  limit = f("time_step_limit")
  lo_hi = [_as_float(v) for v in limit] if isinstance(limit, (list, tuple)) and len(limit) == 2 else None
  if lo_hi != [0.0, math.inf]:
    f.fail("time_step_limit", limit, "[0.0, inf] (no clamp of dt)")


def _ssm_width(f, d_model, expand_name, inner):
  """(ssm_expand, ssm_inner_dim) giving an SSM inner width of `inner`."""
  expand = f.float(expand_name)
  if expand == int(expand) and int(expand) * d_model == inner:
    return int(expand), 0
  return 2, inner


def model_config(hf):
  """(archs.lm.Config, arch) for an HF config dict; ConversionError for anything not reproduced exactly."""
  from altbench.archs import lm
  archs_ = hf.get("architectures") or []
  supported = [a for a in archs_ if a in ARCHITECTURES]
  if not supported:
    if archs_:
      raise ConversionError(f"config field architectures={archs_!r} is not supported; valid: {sorted(ARCHITECTURES)}")
    by_type = {t: a for a, t in ARCHITECTURES.items()}
    if hf.get("model_type") not in by_type:
      raise ConversionError(f"config field model_type={hf.get('model_type')!r} is not supported; valid: "
                            f"{sorted(by_type)}")
    supported = [by_type[hf["model_type"]]]
  arch = ARCHITECTURES[supported[0]]
  f = _Fields(hf, arch)
  f.require("hidden_act", ("silu",))
  d, n_layers, vocab = f.int("hidden_size"), f.int("num_hidden_layers"), f.int("vocab_size")
  common = dict(d_model=d, vocab_size=vocab, tie_embeddings=f.bool("tie_word_embeddings"))

  if arch in ("llama", "falcon_h1"):
    biases = ("attention_bias", "mlp_bias") + (("projectors_bias", "mamba_proj_bias") if arch == "falcon_h1" else ())
    for name in biases:
      f.require(name, (False,))
    heads = f.int("num_attention_heads")
    kv = f("num_key_value_heads") or heads
    head_dim = f("head_dim") or d // heads
    if not isinstance(head_dim, int) or head_dim <= 0:
      f.fail("head_dim", head_dim, "a positive integer")
    if not isinstance(kv, int) or heads % kv:
      f.fail("num_key_value_heads", kv, f"a divisor of num_attention_heads={heads}")
    common.update(n_heads=heads, n_kv_heads=kv, head_dim=head_dim, d_ff=f.int("intermediate_size"),
                  rope_theta=_check_rope(f))
    layer_types = hf.get("layer_types")
    if layer_types is not None and set(layer_types) - {"full_attention", "hybrid"}:
      f.fail("layer_types", layer_types, "only full attention ('full_attention' / 'hybrid') layers")

  if arch == "llama":
    cfg = lm.Config(pattern="A" * n_layers, norm_eps=f.float("rms_norm_eps"), **common)
  elif arch == "mamba2":
    f.require("use_bias", (False,))
    f.bool("use_conv_bias")
    _check_dt_limit(f)
    if hf.get("rmsnorm", True) is not True:
      f.fail("rmsnorm", hf["rmsnorm"], "True (transformers' Mamba2 always has the gated RMSNorm)")
    if hf.get("norm_before_gate", False) is not False:
      f.fail("norm_before_gate", hf["norm_before_gate"], "False (transformers' Mamba2 gates before the norm)")
    heads, headdim = f.int("num_heads"), f.int("head_dim")
    inner = int(f.float("expand") * d)
    if inner != heads * headdim:
      f.fail("num_heads", heads, f"expand * hidden_size / head_dim = {inner} / {headdim}")
    expand, inner_dim = _ssm_width(f, d, "expand", inner)
    cfg = lm.Config(pattern="M" * n_layers, n_heads=1, mlp=False, norm_eps=f.float("layer_norm_epsilon"),
                    d_state=f.int("state_size"), ssm_headdim=headdim, ssm_ngroups=f.int("n_groups"),
                    ssm_expand=expand, ssm_inner_dim=inner_dim, d_conv=f.int("conv_kernel"),
                    chunk_size=f.int("chunk_size"), norm_before_gate=False, **common)
  else:
    f.bool("mamba_conv_bias")
    _check_dt_limit(f)
    block_types = hf.get("layers_block_type")
    if block_types is not None and set(block_types) != {"hybrid"}:
      f.fail("layers_block_type", block_types, "all 'hybrid' (attention and Mamba-2 in parallel)")
    inner = f.int("mamba_d_ssm") if f("mamba_d_ssm") is not None else int(f.float("mamba_expand") * d)
    heads = f.int("mamba_n_heads")
    headdim = f("mamba_d_head")
    headdim = inner // heads if headdim == "auto" else headdim
    if not isinstance(headdim, int) or headdim * heads != inner:
      f.fail("mamba_d_head", f("mamba_d_head"), f"mamba_d_ssm / mamba_n_heads = {inner} / {heads}")
    expand, inner_dim = _ssm_width(f, d, "mamba_expand", inner)
    gate_m, down_m = f.floats("mlp_multipliers", 2)
    z_m, x_m, b_m, c_m, dt_m = f.floats("ssm_multipliers", 5)
    cfg = lm.Config(
        pattern="P" * n_layers, norm_eps=f.float("rms_norm_eps"), d_state=f.int("mamba_d_state"),
        ssm_headdim=headdim, ssm_ngroups=f.int("mamba_n_groups"), ssm_expand=expand, ssm_inner_dim=inner_dim,
        d_conv=f.int("mamba_d_conv"), chunk_size=f.int("mamba_chunk_size"),
        norm_before_gate=f.bool("mamba_norm_before_gate"), ssm_norm=f.bool("mamba_rms_norm"),
        attn_in_multiplier=f.float("attention_in_multiplier"), attn_out_multiplier=f.float("attention_out_multiplier"),
        ssm_in_multiplier=f.float("ssm_in_multiplier"), ssm_out_multiplier=f.float("ssm_out_multiplier"),
        embed_multiplier=f.float("embedding_multiplier"), logits_multiplier=f.float("lm_head_multiplier"),
        attn_key_multiplier=f.float("key_multiplier"), mlp_gate_multiplier=gate_m, mlp_down_multiplier=down_m,
        ssm_z_multiplier=z_m, ssm_x_multiplier=x_m, ssm_b_multiplier=b_m, ssm_c_multiplier=c_m,
        ssm_dt_multiplier=dt_m, **common)
  try:
    cfg.validate()
  except ValueError as e:
    raise ConversionError(f"{arch} config maps to an invalid model.{e}") from None
  return cfg, arch


# ----------------------------------------------------------------------------------------------- weights


class _Weights:
  """Takes HF tensors by name (float32 numpy), remembering which were used."""

  def __init__(self, tensors, arch):
    self.tensors, self.arch, self.used = tensors, arch, set()

  def has(self, name):
    return name in self.tensors

  def get(self, name):
    if name not in self.tensors:
      raise ConversionError(f"{self.arch} checkpoint has no tensor {name!r}")
    self.used.add(name)
    return np.asarray(self.tensors[name], np.float32)

  def linear(self, name):
    return self.get(name).T  # torch Linear (out, in) -> flax kernel (in, out)

  def conv(self, name):
    w = self.get(name)
    if w.ndim != 3 or w.shape[1] != 1:
      raise ConversionError(f"{name}: shape {w.shape}; expected a depthwise conv1d weight (channels, 1, width)")
    return w[:, 0, :].T  # (C, 1, K) -> (K, C); tap i multiplies x[t - (K - 1 - i)] in both

  def unused(self):
    # Non-persistent buffers some older exports saved anyway.
    return sorted(k for k in self.tensors if k not in self.used and not k.endswith("rotary_emb.inv_freq")
                  and not k.endswith(".mup_vector"))


def _mamba(w, prefix, cfg, conv_bias):
  out = {"in_proj/kernel": w.linear(f"{prefix}.in_proj.weight"), "conv_kernel": w.conv(f"{prefix}.conv1d.weight"),
         "A_log": w.get(f"{prefix}.A_log"), "dt_bias": w.get(f"{prefix}.dt_bias"), "D": w.get(f"{prefix}.D"),
         "out_proj/kernel": w.linear(f"{prefix}.out_proj.weight")}
  conv_dim = cfg.ssm_inner + 2 * cfg.ssm_ngroups * cfg.d_state
  out["conv_bias"] = w.get(f"{prefix}.conv1d.bias") if conv_bias else np.zeros((conv_dim,), np.float32)
  if cfg.ssm_norm:
    out["norm/scale"] = w.get(f"{prefix}.norm.weight")
  return out


def _attention(w, prefix):
  return {f"{ours}/kernel": w.linear(f"{prefix}.{hf}_proj.weight") for ours, hf in zip("qkvo", "qkvo")}


def _mlp(w, prefix):
  return {f"{p}/kernel": w.linear(f"{prefix}.{p}_proj.weight") for p in ("gate", "up", "down")}


def _prefixed(prefix, d):
  return {f"{prefix}/{k}": v for k, v in d.items()}


def convert_weights(hf, arch, cfg, tensors):
  """{'embed/embedding': array, 'backbone/blocks/0/mixer/q/kernel': array, ...} for an archs.lm.LM."""
  w, f = _Weights(tensors, arch), _Fields(hf, arch)
  out = {}
  if arch == "llama":
    embed, final = "model.embed_tokens.weight", "model.norm.weight"
    for i in range(len(cfg.pattern)):
      p, b = f"model.layers.{i}", f"backbone/blocks/{i}"
      out[f"{b}/mixer_norm/scale"] = w.get(f"{p}.input_layernorm.weight")
      out[f"{b}/mlp_norm/scale"] = w.get(f"{p}.post_attention_layernorm.weight")
      out.update(_prefixed(f"{b}/mixer", _attention(w, f"{p}.self_attn")))
      out.update(_prefixed(f"{b}/mlp", _mlp(w, f"{p}.mlp")))
  elif arch == "mamba2":
    embed = "backbone.embeddings.weight" if w.has("backbone.embeddings.weight") else "backbone.embedding.weight"
    final = "backbone.norm_f.weight"
    for i in range(len(cfg.pattern)):
      p, b = f"backbone.layers.{i}", f"backbone/blocks/{i}"
      out[f"{b}/mixer_norm/scale"] = w.get(f"{p}.norm.weight")
      out.update(_prefixed(f"{b}/mixer", _mamba(w, f"{p}.mixer", cfg, f("use_conv_bias"))))
  else:
    embed, final = "model.embed_tokens.weight", "model.final_layernorm.weight"
    for i in range(len(cfg.pattern)):
      p, b = f"model.layers.{i}", f"backbone/blocks/{i}"
      out[f"{b}/mixer_norm/scale"] = w.get(f"{p}.input_layernorm.weight")
      out[f"{b}/mlp_norm/scale"] = w.get(f"{p}.pre_ff_layernorm.weight")
      out.update(_prefixed(f"{b}/mixer/attn", _attention(w, f"{p}.self_attn")))
      out.update(_prefixed(f"{b}/mixer/ssm", _mamba(w, f"{p}.mamba", cfg, f("mamba_conv_bias"))))
      out.update(_prefixed(f"{b}/mlp", _mlp(w, f"{p}.feed_forward")))
  out["embed/embedding"] = w.get(embed)
  out["backbone/final_norm/scale"] = w.get(final)
  if cfg.tie_embeddings:
    if w.has("lm_head.weight") and not np.array_equal(w.get("lm_head.weight"), out["embed/embedding"]):
      raise ConversionError(f"{arch} config field tie_word_embeddings=True, but lm_head.weight differs from {embed}")
  else:
    if not w.has("lm_head.weight"):
      raise ConversionError(f"{arch} config field tie_word_embeddings=False, but the checkpoint has no lm_head.weight")
    out["head/kernel"] = w.linear("lm_head.weight")
  unused = w.unused()
  if unused:
    raise ConversionError(f"{arch} checkpoint has tensors this conversion does not map (biases or layers the "
                          f"config does not describe): {unused[:8]}{' ...' if len(unused) > 8 else ''}")
  return out


# --------------------------------------------------------------------------------------------- run dir


def _path(key_path):
  parts = []
  for k in key_path:
    name = getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
    if name != "value":
      parts.append(str(name))
  return "/".join(parts)


def train_state(cfg, weights):
  """The {"params", "rest", "opt", "step"} state of train/step.py:init_state with params set to `weights`."""
  import jax
  import jax.numpy as jnp

  from altbench import archs
  from altbench.train import step
  family = archs.get_family(cfg.family)
  tx = step.make_optimizer(cfg.train)
  init = lambda: step.init_state(family, cfg.model, tx, cfg.train.seed)[1]
  shapes = jax.eval_shape(init)
  left = dict(weights)

  def fill(key_path, shape):
    name = _path(key_path)
    if name not in left:
      raise ConversionError(f"model parameter {name} {shape.shape} has no converted weight")
    value = left.pop(name)
    if value.shape != shape.shape:
      raise ConversionError(f"model parameter {name}: the checkpoint gives shape {value.shape}, the config "
                            f"{shape.shape}")
    return jnp.asarray(value, shape.dtype)

  params = jax.tree_util.tree_map_with_path(fill, shapes["params"])
  if left:
    raise ConversionError(f"converted weights with no model parameter: {sorted(left)[:8]}")
  rest = jax.jit(lambda: init()["rest"])() if jax.tree.leaves(shapes["rest"]) else shapes["rest"]
  state = {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  assert jax.tree.structure(state) == jax.tree.structure(shapes), "state structure differs from init_state's"
  return state


def convert(hf_dir, out_dir, overrides=(), log=print):
  """Write run directory out_dir from the HF model in hf_dir; returns its train.config.Config.

  overrides: 'section.field=value' strings applied to the generated config (e.g. data.dataset=text:PATH,
  model.param_dtype=bfloat16); ones that change the architecture fail the weight shape checks.
  """
  from altbench.train import checkpoint, loop, metrics
  hf = read_config(hf_dir)
  model_cfg, arch = model_config(hf)
  cfg = config_lib.apply_overrides(config_lib.Config(family="lm", model=model_cfg), overrides)
  config_lib.validate(cfg)
  if os.path.exists(os.path.join(out_dir, "config.json")) or os.path.exists(os.path.join(out_dir, "checkpoints")):
    raise config_lib.ConfigError(f"{out_dir} already holds a run; choose another --out")
  weights = convert_weights(hf, arch, cfg.model, read_weights(hf_dir))
  state = train_state(cfg, weights)
  os.makedirs(out_dir, exist_ok=True)
  ckpt = checkpoint.Checkpointer(out_dir, cfg.train.keep_checkpoints)
  ckpt.save(0, state)
  ckpt.close()
  shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(out_dir, "hf_config.json"))
  from altbench.train import data
  tokenizer_vocab = data.ByteTokenizer().vocab_size if cfg.data.tokenizer == "bytes" else None
  note = {"source": os.path.abspath(hf_dir), "architecture": [a for a, t in ARCHITECTURES.items() if t == arch][0],
          "hf_dtype": hf.get("dtype", hf.get("torch_dtype")), "param_dtype": cfg.model.param_dtype,
          "tokenizer": ("the Hugging Face model's own tokenizer (not in this run directory); data.tokenizer only "
                        "feeds eval/sample the bench's ids, so their bpb and text are not the model's")}
  if tokenizer_vocab is not None and cfg.model.vocab_size < tokenizer_vocab:
    note["warning"] = (f"model.vocab_size={cfg.model.vocab_size} is smaller than the byte tokenizer's "
                       f"{tokenizer_vocab} ids: eval and sample would index past the embedding")
  metrics.write_json_atomic(os.path.join(out_dir, "config.json"),
                            {"config": config_lib.to_dict(cfg), "versions": loop.versions(), "converted_from": note})
  n = sum(v.size for v in weights.values())
  log(f"altbench: converted {note['architecture']} ({n / 1e6:.2f}M parameters, pattern "
      f"{cfg.model.pattern!r}) from {hf_dir} into {out_dir}")
  return cfg
