"""The Gated DeltaNet mixer ("G"): the delta-rule linear RNN of Qwen3-Next's hybrid, on `kernels.gated_delta`.

Follows the layer of Yang, Kautz & Hatamizadeh (2024), "Gated Delta Networks", as flash-linear-attention's
`GatedDeltaNet` builds it: one fused in_proj gives q, k (h x dk), v (h x dv), an output gate (h x dv) and
per-head beta and decay inputs; q, k, v each pass a width-d_conv causal depthwise conv with SiLU (one conv
over their concatenation: depthwise, so the same thing); q and k are L2-normalised per head;
beta = sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias) (A in (0, 16], dt log-uniform in [1e-3, 0.1] at
init, as Mamba-2); the kernel's output is RMS-normalised per head and gated by silu(gate) (norm, then gate),
then projected back. The per-head norm has one scale per channel (FLA shares one dv-sized scale across heads:
a subset of ours). Per-channel (KDA-style) decay is not offered: the kernel takes one log-decay per head.

Decoding keeps the conv state (the last d_conv - 1 inputs) and the (h, dk, dv) delta-rule state, so a token
costs the same whatever the context; prefill hands the chunked kernel's final state to decode, and each
decode step is the kernel's own one-token recurrence (impl="reference" on length 1), not a second copy.
Bidirectional (causal=False, for text diffusion): the same weights also run right to left and the two
outputs are summed, as the Mamba-2 mixer does.
"""

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from altbench import kernels
from altbench.archs.layers import normal
from altbench.archs.mamba2 import (GatedRMSNorm, _uniform, causal_conv, conv_params, conv_step, conv_tail,
                                   dt_bias_init)


def l2_normalize(x, eps=1e-6):
  """x / sqrt(sum x^2 + eps) over the last axis, in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class GatedDeltaNet(nnx.Module):
  """Gated DeltaNet mixer on (b, l, d_model); causal, or run on the reversed sequence too when bidirectional."""

  def __init__(self, cfg, rngs, *, out_std):
    d, h, dk, dv = cfg.d_model, cfg.gdn_n_heads, cfg.gdn_dk, cfg.gdn_dv
    self.heads, self.dk, self.dv = h, dk, dv
    self.conv_dim = h * (2 * dk + dv)
    self.d_conv, self.chunk_size, self.impl = cfg.d_conv, cfg.chunk_size, cfg.gdn_impl
    self.causal, self.compute_dtype = cfg.causal, cfg.compute_dtype
    pd = cfg.weight_dtype
    # [q, k, v, gate, beta input, decay input]
    self.in_proj = nnx.Linear(d, self.conv_dim + h * dv + 2 * h, use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=pd, kernel_init=normal(cfg.init_std), rngs=rngs)
    self.conv_kernel, self.conv_bias = conv_params(rngs, cfg.d_conv, self.conv_dim, pd)
    self.A_log = nnx.Param(jnp.log(_uniform(1e-4, 16.0)(rngs.params(), (h,), jnp.float32)).astype(pd))
    self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), h, pd))
    self.norm = GatedRMSNorm(h * dv, h, cfg.norm_eps, True, pd)
    self.out_proj = nnx.Linear(h * dv, d, use_bias=False, dtype=cfg.compute_dtype, param_dtype=pd,
                               kernel_init=normal(out_std), rngs=rngs)

  def _split(self, x_BLD):
    """in_proj -> qkv (b, l, conv_dim), gate (b, l, h dv), beta and decay inputs (b, l, h)."""
    h, dv = self.heads, self.dv
    return jnp.split(self.in_proj(x_BLD), [self.conv_dim, self.conv_dim + h * dv, self.conv_dim + h * dv + h],
                     axis=-1)

  def _kernel_inputs(self, qkv, b_in, a_in):
    """Conv output -> the kernel's q, k (L2-normalised), v in the compute dtype; g and beta in float32."""
    h, dk = self.heads, self.dk
    q, k, v = jnp.split(qkv, [h * dk, 2 * h * dk], axis=-1)
    q, k = (l2_normalize(rearrange(t, "b l (h k) -> b l h k", h=h)).astype(self.compute_dtype) for t in (q, k))
    v = rearrange(v, "b l (h v) -> b l h v", h=h).astype(self.compute_dtype)
    beta = jax.nn.sigmoid(b_in.astype(jnp.float32))
    g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
        a_in.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    return q, k, v, g, beta

  def _out(self, o_BLHV, gate):
    y = self.norm(rearrange(o_BLHV, "b l h v -> b l (h v)"), gate)
    return self.out_proj(y.astype(self.compute_dtype))

  def _mix(self, x_BLD, seg_BL, initial_state=None):
    qkv, gate, b_in, a_in = self._split(x_BLD)
    q, k, v, g, beta = self._kernel_inputs(causal_conv(qkv, self.conv_kernel[...], self.conv_bias[...], seg_BL),
                                           b_in, a_in)
    o, final = kernels.gated_delta(q, k, v, g, beta, initial_state=initial_state, return_final_state=True,
                                   seq_idx=seg_BL, chunk_size=self.chunk_size, impl=self.impl)
    return self._out(o, gate), final, qkv

  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None, cache=None, cache_index=None, attn_mask=None):
    del positions_BL, cache_index
    if attn_mask is not None:
      raise ValueError("a Gated DeltaNet mixer cannot follow an arbitrary attention mask (block diffusion needs "
                       "pattern 'A')")
    seg = segment_ids_BL
    if not self.causal:
      if cache is not None:
        raise ValueError("a bidirectional Gated DeltaNet mixer has no decode cache")
      forward = self._mix(x_BLD, seg)[0]
      backward = self._mix(x_BLD[:, ::-1], None if seg is None else seg[:, ::-1])[0]  # same weights
      return forward + backward[:, ::-1], None
    if cache is None:
      return self._mix(x_BLD, seg)[0], None
    if x_BLD.shape[1] > 1:  # prefill from an empty cache: the chunked kernel's final state seeds decoding
      out, final, qkv = self._mix(x_BLD, seg)
      return out, {"conv": conv_tail(qkv, self.d_conv, cache["conv"].dtype), "state": final}
    return self._step(x_BLD, cache)

  def _step(self, x_B1D, cache):
    """One recurrent decode step: O(1) in the context length."""
    qkv, gate, b_in, a_in = self._split(x_B1D)
    conv, window = conv_step(cache["conv"], qkv, self.conv_kernel[...], self.conv_bias[...])
    q, k, v, g, beta = self._kernel_inputs(conv, b_in, a_in)
    o, state = kernels.gated_delta(q, k, v, g, beta, initial_state=cache["state"], return_final_state=True,
                                   impl="reference")
    return self._out(o, gate), {"conv": window, "state": state}


def init_cache(cfg, batch_size):
  h, dk, dv = cfg.gdn_n_heads, cfg.gdn_dk, cfg.gdn_dv
  return {"conv": jnp.zeros((batch_size, cfg.d_conv - 1, h * (2 * dk + dv)), jnp.float32),
          "state": jnp.zeros((batch_size, h, dk, dv), jnp.float32)}


def forward_flops_per_token(cfg):
  """Matmul-like FLOPs per token of one Gated DeltaNet mixer forward, chunked kernel with chunk length C.

  Projections and the conv, plus per head (kernels/gated_delta.py's XLA path): the chunk-local products
  K K^T, T (beta V), T (beta e^g K), Q K^T and (Q K^T * G) V' (2 C (3 dk + 2 dv)); the state terms W S0,
  K^T V' and Q S0 (6 dk dv); and the triangular inverse by recursive doubling (2 C^2 / 3 with C the chunk
  rounded up to a power of two). The chunk is the configured one, as the kernel runs it on long sequences.
  """
  d, h, dk, dv, c = cfg.d_model, cfg.gdn_n_heads, cfg.gdn_dk, cfg.gdn_dv, cfg.chunk_size
  conv_dim = h * (2 * dk + dv)
  proj = 2 * d * (conv_dim + h * dv + 2 * h) + 2 * h * dv * d
  c2 = 1 << (c - 1).bit_length()
  kernel = h * (2 * c * (3 * dk + 2 * dv) + 6 * dk * dv + 2 * c2 * c2 / 3)
  return proj + 2 * conv_dim * cfg.d_conv + kernel
