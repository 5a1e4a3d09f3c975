"""The layer stack every family shares, described by a pattern string (one character per block).

"A" is attention, "M" a Mamba-2 mixer, "G" a Gated DeltaNet mixer, "P" attention and Mamba-2 in parallel
on the same normed input (Falcon-H1), each in a pre-norm residual block followed by a SwiGLU MLP (unless
mlp=False, as in pure Mamba-2 stacks). A hybrid is a pattern ("MMAMMMAM", Qwen3-Next's "GGGA"), not a file.
"""

import dataclasses
import importlib
import math

import jax.numpy as jnp
from flax import nnx

from altbench.archs import gated_deltanet, hooks, mamba2
from altbench.archs.layers import MLP, Attention, RMSNorm

BLOCK_TYPES = {"A": "attention", "M": "Mamba-2", "G": "Gated DeltaNet",
               "P": "attention and Mamba-2 in parallel (Falcon-H1)"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ATTN_IMPLS = importlib.import_module("altbench.kernels.attention").IMPLS  # kernels.attention impls
SSM_IMPLS = importlib.import_module("altbench.kernels.ssd").IMPLS  # kernels.ssd impls
GDN_IMPLS = importlib.import_module("altbench.kernels.gated_delta").IMPLS  # kernels.gated_delta impls
MULTIPLIERS = ("attn_in_multiplier", "attn_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier",
               "embed_multiplier", "logits_multiplier", "attn_key_multiplier", "mlp_gate_multiplier",
               "mlp_down_multiplier", "ssm_z_multiplier", "ssm_x_multiplier", "ssm_b_multiplier", "ssm_c_multiplier",
               "ssm_dt_multiplier")


@dataclasses.dataclass(frozen=True)
class Config:
  pattern: str = "AAAA"        # one block per character, see BLOCK_TYPES
  d_model: int = 256
  n_heads: int = 4
  n_kv_heads: int = 0          # 0: as many as n_heads (plain multi-head attention)
  head_dim: int = 0            # 0: d_model // n_heads
  d_ff: int = 0                # 0: 8/3 d_model rounded up to a multiple of 64
  vocab_size: int = 0          # 0: the tokenizer's vocabulary size
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  causal: bool = True          # False gives the bidirectional backbone text diffusion needs
  attn_impl: str = "auto"      # kernels.attention impl
  dtype: str = "float32"       # compute dtype of activations and matmuls
  param_dtype: str = "float32"
  init_std: float = 0.02
  mlp: bool = True             # a SwiGLU MLP after each mixer (pure Mamba-2 stacks usually have none)
  # Mamba-2 mixer ("M", "P")
  d_state: int = 64
  ssm_headdim: int = 64
  ssm_ngroups: int = 1
  ssm_expand: int = 2
  d_conv: int = 4
  chunk_size: int = 64
  norm_before_gate: bool = False
  ssm_impl: str = "auto"       # kernels.ssd impl
  # Gated DeltaNet mixer ("G"; shares d_conv and chunk_size with Mamba-2)
  gdn_heads: int = 0           # 0: n_heads
  gdn_head_dim: int = 0        # dk, of q and k; 0: d_model // gdn heads
  gdn_expand_v: int = 2        # dv = gdn_expand_v * dk (flash-linear-attention's default expand_v)
  gdn_impl: str = "auto"       # kernels.gated_delta impl
  # Falcon-H1 parallel block ("P"): mixer inputs and outputs are scaled before they are summed
  attn_in_multiplier: float = 1.0
  attn_out_multiplier: float = 1.0
  ssm_in_multiplier: float = 1.0
  ssm_out_multiplier: float = 1.0
  # Imported checkpoints (train/convert_hf.py); the defaults leave the model as above
  ssm_inner_dim: int = 0       # 0: ssm_expand * d_model (Falcon-H1's mamba_d_ssm sets it directly)
  ssm_norm: bool = True        # False: y * silu(z), no gated RMSNorm (Falcon-H1 mamba_rms_norm=False)
  embed_multiplier: float = 1.0    # Falcon-H1 muP multipliers: token embeddings,
  logits_multiplier: float = 1.0   # output logits,
  attn_key_multiplier: float = 1.0  # attention keys,
  mlp_gate_multiplier: float = 1.0  # the SwiGLU gate before its silu,
  mlp_down_multiplier: float = 1.0  # the MLP output,
  ssm_z_multiplier: float = 1.0    # and the Mamba-2 in_proj outputs z, x, B, C, dt (its "mup vector")
  ssm_x_multiplier: float = 1.0
  ssm_b_multiplier: float = 1.0
  ssm_c_multiplier: float = 1.0
  ssm_dt_multiplier: float = 1.0

  @property
  def kv_heads(self):
    return self.n_kv_heads or self.n_heads

  @property
  def dim_head(self):
    return self.head_dim or self.d_model // self.n_heads

  @property
  def ffn_dim(self):
    return self.d_ff or -(-8 * self.d_model // 3 // 64) * 64

  @property
  def ssm_inner(self):
    return self.ssm_inner_dim or self.ssm_expand * self.d_model

  @property
  def ssm_heads(self):
    return self.ssm_inner // self.ssm_headdim

  @property
  def gdn_n_heads(self):
    return self.gdn_heads or self.n_heads

  @property
  def gdn_dk(self):
    return self.gdn_head_dim or self.d_model // self.gdn_n_heads

  @property
  def gdn_dv(self):
    return self.gdn_expand_v * self.gdn_dk

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def validate(self):
    """Raises ValueError naming the first bad field, its value and what would be valid."""
    bad = sorted(set(self.pattern) - set(BLOCK_TYPES))
    if not self.pattern or bad:
      raise ValueError(f"pattern={self.pattern!r}: unknown block {bad or 'none given'}; valid: {BLOCK_TYPES}")
    for name in ("d_model", "n_heads"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}={getattr(self, name)}: must be positive")
    if self.n_heads % self.kv_heads:
      raise ValueError(f"n_kv_heads={self.n_kv_heads}: must divide n_heads={self.n_heads}")
    if not self.head_dim and self.d_model % self.n_heads:
      raise ValueError(f"n_heads={self.n_heads}: must divide d_model={self.d_model} (or set head_dim)")
    if self.dim_head % 2:
      raise ValueError(f"head_dim={self.dim_head}: must be even for rotary embeddings")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r}: valid: {sorted(DTYPES)}")
    if self.attn_impl not in ATTN_IMPLS:
      raise ValueError(f"attn_impl={self.attn_impl!r}: valid: {ATTN_IMPLS}")
    for name in MULTIPLIERS:
      if not math.isfinite(getattr(self, name)):
        raise ValueError(f"{name}={getattr(self, name)}: valid: a finite float (1.0 leaves the model unchanged)")
    if self.ssm_inner_dim < 0:
      raise ValueError(f"ssm_inner_dim={self.ssm_inner_dim}: valid: 0 (ssm_expand * d_model) or a positive width")
    if set(self.pattern) & set("MP"):
      if self.ssm_inner % self.ssm_headdim:
        raise ValueError(f"ssm_headdim={self.ssm_headdim}: must divide the SSM inner width {self.ssm_inner} "
                         "(ssm_inner_dim, or ssm_expand * d_model when it is 0)")
      if self.ssm_heads % self.ssm_ngroups:
        raise ValueError(f"ssm_ngroups={self.ssm_ngroups}: must divide the {self.ssm_heads} SSM heads")
      if not 1 <= self.d_state <= 256:
        raise ValueError(f"d_state={self.d_state}: valid: 1..256")
      if self.d_conv < 2 or self.chunk_size < 1:
        raise ValueError(f"d_conv={self.d_conv}, chunk_size={self.chunk_size}: need d_conv >= 2, chunk_size >= 1")
      if self.ssm_impl not in SSM_IMPLS:
        raise ValueError(f"ssm_impl={self.ssm_impl!r}: valid: {SSM_IMPLS}")
    if "G" in self.pattern:
      for name in ("gdn_heads", "gdn_head_dim"):
        if getattr(self, name) < 0:
          raise ValueError(f"{name}={getattr(self, name)}: valid: 0 (the default) or a positive int")
      if self.gdn_expand_v < 1:
        raise ValueError(f"gdn_expand_v={self.gdn_expand_v}: valid: a positive int (dv = gdn_expand_v * dk)")
      if self.gdn_dk < 1:
        raise ValueError(f"gdn_heads={self.gdn_n_heads}: more heads than d_model={self.d_model} channels "
                         "(set gdn_head_dim)")
      if self.d_conv < 2 or self.chunk_size < 1:
        raise ValueError(f"d_conv={self.d_conv}, chunk_size={self.chunk_size}: need d_conv >= 2, chunk_size >= 1")
      if self.gdn_impl not in GDN_IMPLS:
        raise ValueError(f"gdn_impl={self.gdn_impl!r}: valid: {GDN_IMPLS}")


class Parallel(nnx.Module):
  """Falcon-H1 mixer: attention and Mamba-2 read the same normed input; their scaled outputs are summed."""

  def __init__(self, cfg, rngs, *, out_std):
    self.attn = Attention(cfg, rngs, out_std=out_std)
    self.ssm = mamba2.Mamba2(cfg, rngs, out_std=out_std)
    self.m = (cfg.attn_in_multiplier, cfg.attn_out_multiplier, cfg.ssm_in_multiplier, cfg.ssm_out_multiplier)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None, cache=None, cache_index=None, attn_mask=None):
    attn_in, attn_out, ssm_in, ssm_out = self.m
    a, a_cache = self.attn(x_BLD * attn_in, positions_BL, segment_ids_BL, cache and cache["attn"], cache_index,
                           attn_mask)
    s, s_cache = self.ssm(x_BLD * ssm_in, positions_BL, segment_ids_BL, cache and cache["ssm"], cache_index,
                          attn_mask)
    a, s = hooks.tap(self, "attn.out", a * attn_out), hooks.tap(self, "ssm.out", s * ssm_out)
    return a + s, (None if cache is None else {"attn": a_cache, "ssm": s_cache})


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm(x)), then (optionally) x + mlp(norm(x))."""

  def __init__(self, kind, cfg, rngs):
    out_std = cfg.init_std / (2 * len(cfg.pattern)) ** 0.5  # GPT-2: keep the residual stream's variance flat
    norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.kind = kind
    self.mixer_norm = norm()
    mixers = {"A": Attention, "M": mamba2.Mamba2, "G": gated_deltanet.GatedDeltaNet, "P": Parallel}
    self.mixer = mixers[kind](cfg, rngs, out_std=out_std)
    self.mlp_norm = norm() if cfg.mlp else None
    self.mlp = MLP(cfg, rngs, out_std=out_std) if cfg.mlp else None

  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None, cache=None, cache_index=None, attn_mask=None):
    x_BLD = hooks.tap(self, "resid_pre", x_BLD)
    h, cache = self.mixer(self.mixer_norm(x_BLD), positions_BL, segment_ids_BL, cache, cache_index, attn_mask)
    x_BLD = x_BLD + hooks.tap(self, "mixer_out", h)
    if self.mlp is not None:
      x_BLD = hooks.tap(self, "resid_mid", x_BLD)
      x_BLD = x_BLD + hooks.tap(self, "mlp_out", self.mlp(self.mlp_norm(x_BLD)))
    return hooks.tap(self, "resid_post", x_BLD), cache


class Backbone(nnx.Module):
  """The block stack and final norm: (b, l, d) embeddings in, normed (b, l, d) hidden states out."""

  def __init__(self, cfg, rngs):
    self.blocks = nnx.List([Block(kind, cfg, rngs) for kind in cfg.pattern])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None, cache=None, cache_index=None, attn_mask=None):
    x_BLD = hooks.tap(self, "embed", x_BLD)
    new_cache = []
    for i, block in enumerate(self.blocks):
      x_BLD, layer_cache = block(x_BLD, positions_BL, segment_ids_BL, None if cache is None else cache[i],
                                 cache_index, attn_mask)
      new_cache.append(layer_cache)
    return self.final_norm(x_BLD), (None if cache is None else new_cache)


def init_cache(cfg, batch_size, max_len):
  """Empty per-block decode state: a KV cache for attention, conv and recurrent states for Mamba-2 and
  Gated DeltaNet."""
  shape = (batch_size, max_len, cfg.kv_heads, cfg.dim_head)
  kv = lambda: {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}
  make = {"A": kv, "M": lambda: mamba2.init_cache(cfg, batch_size),
          "G": lambda: gated_deltanet.init_cache(cfg, batch_size),
          "P": lambda: {"attn": kv(), "ssm": mamba2.init_cache(cfg, batch_size)}}
  return [make[kind]() for kind in cfg.pattern]


def forward_flops_per_token(cfg, seq_len):
  """Matmul FLOPs of one forward pass per token (2 per multiply-add), attention over all seq_len keys.

  Counts what the reference and XLA attention compute (the full score matrix, masked afterwards);
  elementwise work (norms, softmax, activations) is left out, as in the usual 6N accounting.
  """
  d, h, hk, hd, f = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_head, cfg.ffn_dim
  attn = 2 * d * hd * (2 * h + 2 * hk) + 2 * 2 * seq_len * h * hd
  directions = 1 if cfg.causal else 2  # a bidirectional recurrent mixer scans both ways
  mixer = {"A": attn, "M": directions * mamba2.forward_flops_per_token(cfg),
           "G": directions * gated_deltanet.forward_flops_per_token(cfg)}
  mixer["P"] = attn + mixer["M"]
  mlp = 2 * 3 * d * f if cfg.mlp else 0
  return sum(mixer[k] + mlp for k in cfg.pattern)
