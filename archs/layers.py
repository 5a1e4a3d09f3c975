"""Building blocks shared by every family: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU."""

import itertools

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from altbench import kernels
from altbench.archs import hooks


def normal(std):
  return nnx.initializers.normal(stddev=std)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 whatever the compute dtype."""

  def __init__(self, dim, *, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return hooks.tap(self, "", (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype))


def rope(x_BLHD, positions_BL, theta):
  """Rotary embedding in the rotate-half convention (Llama / Hugging Face), so imported weights match."""
  half = x_BLHD.shape[-1] // 2
  inv_freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BLF = positions_BL[..., None].astype(jnp.float32) * inv_freq_F
  cos, sin = jnp.cos(angle_BLF)[:, :, None], jnp.sin(angle_BLF)[:, :, None]
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHD.dtype)


def _fused_linear(x, linears):
  """[lin(x) for lin in linears] for bias-free nnx.Linear layers sharing an input, as one matmul.

  On XLA:CPU one wide matmul beats several narrow ones, and the backward reads x once.
  """
  lin0 = linears[0]
  w = jnp.concatenate([lin.kernel[...] for lin in linears], axis=1)
  x, w = lin0.promote_dtype((x, w), dtype=lin0.dtype)
  y = lin0.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=lin0.precision)
  return jnp.split(y, list(itertools.accumulate(lin.out_features for lin in linears[:-1])), axis=-1)


def attention_probs(q_BTHD, k_BSKD, causal, segment_ids_BL=None, mask=None):
  """Softmax probabilities (b, h, T, S) in float32 of the attention kernels.attention computes (same masks and
  default scale): for interpretability only, since the fast kernels never materialise them."""
  groups = q_BTHD.shape[2] // k_BSKD.shape[2]
  k_BSHD = jnp.repeat(k_BSKD.astype(jnp.float32), groups, axis=2)
  scores_BHTS = jnp.einsum("bthd,bshd->bhts", q_BTHD.astype(jnp.float32), k_BSHD) * q_BTHD.shape[-1] ** -0.5
  t, s = q_BTHD.shape[1], k_BSKD.shape[1]
  visible = jnp.ones((1, t, s), bool)
  if causal:
    visible = visible & jnp.tril(jnp.ones((t, s), bool))[None]
  if segment_ids_BL is not None:
    visible = visible & (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])
  if mask is not None:
    visible = visible & (mask if mask.ndim == 3 else mask[None])
  # The kernels mask with a large finite value, so a row with nothing visible is uniform there too.
  return jax.nn.softmax(jnp.where(visible[:, None], scores_BHTS, -0.7 * jnp.finfo(jnp.float32).max), axis=-1)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE; optional KV cache kept outside the module."""

  def __init__(self, cfg, rngs, *, out_std):
    d, h, hk, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_head
    lin = lambda i, o, std: nnx.Linear(i, o, use_bias=False, dtype=cfg.compute_dtype,
                                       param_dtype=cfg.weight_dtype, kernel_init=normal(std), rngs=rngs)
    self.q = lin(d, h * hd, cfg.init_std)
    self.k = lin(d, hk * hd, cfg.init_std)
    self.v = lin(d, hk * hd, cfg.init_std)
    self.o = lin(h * hd, d, out_std)
    self.n_heads, self.kv_heads, self.dim_head = h, hk, hd
    self.causal, self.rope_theta, self.impl = cfg.causal, cfg.rope_theta, cfg.attn_impl
    self.key_multiplier = cfg.attn_key_multiplier

  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None, cache=None, cache_index=None, attn_mask=None):
    # One matmul against [q | k | v] (concatenated here, so parameters and checkpoints are unchanged).
    q, k, v = _fused_linear(x_BLD, (self.q, self.k, self.v))
    k = k if self.key_multiplier == 1.0 else k * self.key_multiplier
    q = rope(rearrange(q, "b l (h d) -> b l h d", h=self.n_heads), positions_BL, self.rope_theta)
    k = rope(rearrange(k, "b l (h d) -> b l h d", h=self.kv_heads), positions_BL, self.rope_theta)
    v = rearrange(v, "b l (h d) -> b l h d", h=self.kv_heads)
    if cache is not None:
      cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, 1),
               "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, 1)}
    if cache is not None and x_BLD.shape[1] == 1:
      # One decode step: attend over every written cache slot (slots <= the current position).
      b, s = x_BLD.shape[0], cache["k"].shape[1]
      visible_BS = (jnp.arange(s)[None] <= positions_BL[:, :1]).astype(jnp.int32)
      out = kernels.attention(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), causal=False,
                              segment_ids=(jnp.ones((b, 1), jnp.int32), visible_BS), impl=self.impl)
    else:
      # Full sequence, or a prefill that starts at an empty cache: the fresh keys are all there is.
      out = kernels.attention(q, k, v, causal=self.causal, segment_ids=segment_ids_BL, mask=attn_mask,
                              impl=self.impl)
      if hooks.wants(self, "pattern"):  # the kernels do not return probabilities: computed only when asked
        probs_BHTS = hooks.tap(self, "pattern", attention_probs(q, k, self.causal, segment_ids_BL, attn_mask))
        if hooks.replaces(self, "pattern"):
          v_BSHD = jnp.repeat(v, self.n_heads // self.kv_heads, axis=2)
          out = jnp.einsum("bhts,bshd->bthd", probs_BHTS.astype(v.dtype), v_BSHD)
    out = hooks.tap(self, "z", out)
    return self.o(rearrange(out, "b l h d -> b l (h d)")), cache


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), with Falcon-H1's optional gate and output multipliers."""

  def __init__(self, cfg, rngs, *, out_std):
    lin = lambda i, o, std: nnx.Linear(i, o, use_bias=False, dtype=cfg.compute_dtype,
                                       param_dtype=cfg.weight_dtype, kernel_init=normal(std), rngs=rngs)
    self.gate = lin(cfg.d_model, cfg.ffn_dim, cfg.init_std)
    self.up = lin(cfg.d_model, cfg.ffn_dim, cfg.init_std)
    self.down = lin(cfg.ffn_dim, cfg.d_model, out_std)
    self.gate_multiplier, self.down_multiplier = cfg.mlp_gate_multiplier, cfg.mlp_down_multiplier

  def __call__(self, x_BLD):
    gate, up = _fused_linear(x_BLD, (self.gate, self.up))  # one matmul against [gate | up]
    gate = gate if self.gate_multiplier == 1.0 else gate * self.gate_multiplier
    out = self.down(jax.nn.silu(gate) * up)
    return out if self.down_multiplier == 1.0 else out * self.down_multiplier
