"""The Mamba-2 mixer: in_proj -> causal depthwise conv -> SSD scan -> gated RMSNorm -> out_proj.

Follows the Mamba-2 paper's block (Dao & Gu, 2024): in_proj gives [z, xBC, dt]; a width-d_conv causal
depthwise convolution with SiLU runs over xBC = [x, B, C]; `kernels.ssd` scans x with per-head decay
A = -exp(A_log) and step dt = softplus(dt + dt_bias); the output is normalised with a gate silu(z).
Decoding keeps a conv state (the last d_conv - 1 inputs) and an SSM state (b, h, p, n), so a token
costs the same whatever the context length; prefill hands the chunked scan's final state to decode.
"""

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from altbench import kernels
from altbench.archs import hooks
from altbench.archs.layers import normal


class GatedRMSNorm(nnx.Module):
  """RMSNorm over groups of channels, gated by silu(z) before (default) or after the norm."""

  def __init__(self, dim, groups, eps, norm_before_gate, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.groups, self.eps, self.norm_before_gate = groups, eps, norm_before_gate

  def __call__(self, y, z):
    y = y.astype(jnp.float32)
    gate = jax.nn.silu(z.astype(jnp.float32))
    if not self.norm_before_gate:
      y = y * gate
    if self.groups == 1:  # no size-1 group axis: XLA:CPU runs this fusion about 2x faster without it
      y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
    else:
      y_g = rearrange(y, "... (g c) -> ... g c", g=self.groups)
      y_g = y_g * jax.lax.rsqrt(jnp.mean(y_g * y_g, axis=-1, keepdims=True) + self.eps)
      y = rearrange(y_g, "... g c -> ... (g c)")
    y = y * self.scale[...].astype(jnp.float32)
    return y * gate if self.norm_before_gate else y


def _uniform(lo, hi):
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, lo, hi)


def dt_bias_init(key, heads, dtype):
  """softplus^-1 of steps dt log-uniform in [1e-3, 0.1] (the Mamba-2 paper's, reused by Gated DeltaNet)."""
  dt = jnp.exp(_uniform(math.log(1e-3), math.log(0.1))(key, (heads,), jnp.float32))
  dt = jnp.maximum(dt, 1e-4)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def conv_params(rngs, width, channels, dtype):
  """Kernel (width, channels) and bias of a depthwise conv, PyTorch's default init (fan_in = width)."""
  bound = 1 / math.sqrt(width)
  return (nnx.Param(_uniform(-bound, bound)(rngs.params(), (width, channels), dtype)),
          nnx.Param(_uniform(-bound, bound)(rngs.params(), (channels,), dtype)))


def causal_conv(x_BLC, kernel_KC, bias_C, seg_BL):
  """silu(causal depthwise conv) in float32; taps never reach into an earlier document of a packed sequence
  (seg_BL None: one document per row, no masks to compute)."""
  k = kernel_KC.shape[0]
  pad = lambda a, v: jnp.pad(a, ((0, 0), (k - 1, 0)) + ((0, 0),) * (a.ndim - 2), constant_values=v)
  x_pad = pad(x_BLC.astype(jnp.float32), 0.0)
  seg_pad = None if seg_BL is None else pad(seg_BL, -1)
  kernel = kernel_KC.astype(jnp.float32)
  l = x_BLC.shape[1]
  out = bias_C.astype(jnp.float32)
  for i in range(k):  # tap i multiplies x[t - (k - 1 - i)]
    tap = x_pad[:, i:i + l]
    if seg_pad is not None:
      tap = jnp.where((seg_pad[:, i:i + l] == seg_BL)[..., None], tap, 0.0)
    out = out + tap * kernel[i]
  return jax.nn.silu(out)


def conv_step(state_BKC, x_B1C, kernel_KC, bias_C):
  """One decode step of causal_conv: (silu(conv) (b, 1, c), the new state (the last k - 1 inputs))."""
  window = jnp.concatenate([state_BKC.astype(jnp.float32), x_B1C.astype(jnp.float32)], axis=1)
  conv = jnp.einsum("bkc,kc->bc", window, kernel_KC.astype(jnp.float32)) + bias_C.astype(jnp.float32)
  return jax.nn.silu(conv)[:, None], window[:, 1:].astype(state_BKC.dtype)


def conv_tail(x_BLC, width, dtype):
  """The decode conv state after a prefill: the last width - 1 inputs (zeros before the sequence)."""
  return jnp.pad(x_BLC, ((0, 0), (width - 1, 0), (0, 0)))[:, -(width - 1):].astype(dtype)


class Mamba2(nnx.Module):
  """Mamba-2 mixer on (b, l, d_model); causal, or run on the reversed sequence too when bidirectional."""

  def __init__(self, cfg, rngs, *, out_std):
    d, di, g, n = cfg.d_model, cfg.ssm_inner, cfg.ssm_ngroups, cfg.d_state
    h = cfg.ssm_heads
    self.d_inner, self.heads, self.headdim, self.groups, self.d_state = di, h, cfg.ssm_headdim, g, n
    self.conv_dim = di + 2 * g * n
    self.d_conv, self.chunk_size, self.impl = cfg.d_conv, cfg.chunk_size, cfg.ssm_impl
    self.causal, self.compute_dtype = cfg.causal, cfg.compute_dtype
    pd = cfg.weight_dtype
    self.in_proj = nnx.Linear(d, 2 * di + 2 * g * n + h, use_bias=False, dtype=cfg.compute_dtype, param_dtype=pd,
                              kernel_init=normal(cfg.init_std), rngs=rngs)
    self.conv_kernel, self.conv_bias = conv_params(rngs, cfg.d_conv, self.conv_dim, pd)
    # A in [1, 16] and dt in [1e-3, 0.1] log-uniform, as in the Mamba-2 paper; dt_bias = softplus^-1(dt).
    self.A_log = nnx.Param(jnp.log(_uniform(1.0, 16.0)(rngs.params(), (h,), jnp.float32)).astype(pd))
    self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), h, pd))
    self.D = nnx.Param(jnp.ones((h,), pd))
    self.norm = GatedRMSNorm(di, g, cfg.norm_eps, cfg.norm_before_gate, pd) if cfg.ssm_norm else None
    # Falcon-H1 scales in_proj's z, x, B, C and dt outputs (its "mup vector"); None when all are 1.
    m = (cfg.ssm_z_multiplier, cfg.ssm_x_multiplier, cfg.ssm_b_multiplier, cfg.ssm_c_multiplier, cfg.ssm_dt_multiplier)
    self.proj_multipliers = None if m == (1.0,) * 5 else m
    self.out_proj = nnx.Linear(di, d, use_bias=False, dtype=cfg.compute_dtype, param_dtype=pd,
                               kernel_init=normal(out_std), rngs=rngs)

  def _project(self, x_BLD):
    """in_proj, times the per-segment multipliers when set."""
    zxbcdt = self.in_proj(x_BLD)
    if self.proj_multipliers is None:
      return zxbcdt
    di, gn = self.d_inner, self.groups * self.d_state
    widths = (di, di, gn, gn, self.heads)
    scale = jnp.concatenate([jnp.full((w,), m, jnp.float32) for w, m in zip(widths, self.proj_multipliers)])
    return (zxbcdt * scale).astype(zxbcdt.dtype)

  def _gate(self, y, z):
    """Gated RMSNorm of the scan output, or the bare gate y * silu(z) when ssm_norm is False."""
    if self.norm is not None:
      return self.norm(y, z)
    return y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))

  def _split(self, zxbcdt):
    di, gn = self.d_inner, self.groups * self.d_state
    return jnp.split(zxbcdt, [di, 2 * di + 2 * gn], axis=-1)  # z, xBC, dt

  def _heads(self, xBC):
    """xBC (b, l, conv_dim) -> x (b, l, h, p), B and C (b, l, g, n)."""
    di, gn = self.d_inner, self.groups * self.d_state
    x, B, C = jnp.split(xBC, [di, di + gn], axis=-1)
    return (rearrange(x, "b l (h p) -> b l h p", p=self.headdim), rearrange(B, "b l (g n) -> b l g n", g=self.groups),
            rearrange(C, "b l (g n) -> b l g n", g=self.groups))

  def _scan(self, x_BLD, seg_BL, initial_states=None, state_name="state"):
    z, xBC, dt = self._split(self._project(x_BLD))
    # The scan reads x, B, C in the compute dtype, as mamba_ssm's conv hands them over: float32 operands would
    # run the Pallas kernels' dots at HIGHEST precision, off the bf16 tensor cores.
    xBC = causal_conv(xBC, self.conv_kernel[...], self.conv_bias[...], seg_BL).astype(self.compute_dtype)
    x, B, C = self._heads(xBC)
    y, final = kernels.ssd(x, dt, -jnp.exp(self.A_log[...].astype(jnp.float32)), B, C, self.chunk_size,
                           D=self.D[...], dt_bias=self.dt_bias[...], initial_states=initial_states,
                           seq_idx=seg_BL, dt_softplus=True, return_final_states=True, impl=self.impl)
    if hooks.wants(self, state_name):  # per-position states exist only in interp runs (the kernel keeps none)
      y = self._tap_states(x, dt, B, C, seg_BL, initial_states, y, state_name)
    y = self._gate(rearrange(y, "b l h p -> b l (h p)"), z)
    return self.out_proj(y.astype(self.compute_dtype)), final

  def _tap_states(self, x_BLHP, dt_BLH, B_BLGN, C_BLGN, seg_BL, h0_BHPN, y_BLHP, state_name):
    """Hands the per-position SSM states (b, l, h, p, n) to the active tap (`state_rev`, of the right-to-left
    scan, in the original position order) and returns the scan output, recomputed from the tap's states
    where it replaced some: a replaced state is used at its position and the recurrence continues from it."""
    f32 = jnp.float32
    rep = self.heads // self.groups
    x_BLHP = x_BLHP.astype(f32)
    dt_BLH = jax.nn.softplus(dt_BLH.astype(f32) + self.dt_bias[...].astype(f32))
    decay_BLH = jnp.exp(dt_BLH * -jnp.exp(self.A_log[...].astype(f32)))
    B_BLHN, C_BLHN = (jnp.repeat(t.astype(f32), rep, axis=2) for t in (B_BLGN, C_BLGN))
    b, l, h, p = x_BLHP.shape
    if seg_BL is None:
      seg_BL = jnp.zeros((b, l), jnp.int32)
    reset_BL = seg_BL != jnp.concatenate([seg_BL[:, :1], seg_BL[:, :-1]], axis=1)  # a new document starts
    h0 = jnp.zeros((b, h, p, self.d_state), f32) if h0_BHPN is None else h0_BHPN.astype(f32)
    flip = (lambda a: a[:, ::-1]) if state_name == "state_rev" else (lambda a: a)

    def run(new_BLHPN, use_BLH):
      def step(s, xs):
        x, dt, decay, Bt, reset, new, use = xs
        s = jnp.where(reset[:, None, None, None], 0.0, s) * decay[..., None, None]
        s = s + jnp.einsum("bh,bhp,bhn->bhpn", dt, x, Bt)
        s = jnp.where(use[..., None, None], new, s)
        return s, s
      xs = (x_BLHP, dt_BLH, decay_BLH, B_BLHN, reset_BL, new_BLHPN, use_BLH)
      _, s_LBHPN = jax.lax.scan(step, h0, [jnp.moveaxis(a, 1, 0) for a in xs])
      return jnp.moveaxis(s_LBHPN, 0, 1)

    never_BLH = jnp.zeros((b, l, h), bool)
    states = run(jnp.zeros((b, l, h, p, self.d_state), f32), never_BLH)
    new = flip(hooks.tap(self, state_name, flip(states)))
    if not hooks.replaces(self, state_name):
      return y_BLHP
    states = run(new.astype(f32), jnp.any(new != states, axis=(-2, -1)))
    y = jnp.einsum("blhpn,blhn->blhp", states, C_BLHN) + self.D[...].astype(f32)[:, None] * x_BLHP
    return y.astype(y_BLHP.dtype)

  def __call__(self, x_BLD, positions_BL, segment_ids_BL=None, cache=None, cache_index=None, attn_mask=None):
    del positions_BL
    if attn_mask is not None:
      raise ValueError("a Mamba-2 mixer cannot follow an arbitrary attention mask (block diffusion needs pattern 'A')")
    l = x_BLD.shape[1]
    seg = segment_ids_BL  # None: one document per row, and the conv and scan skip their document masks
    if not self.causal:
      if cache is not None:
        raise ValueError("a bidirectional Mamba-2 mixer has no decode cache")
      forward, _ = self._scan(x_BLD, seg)
      backward, _ = self._scan(x_BLD[:, ::-1], None if seg is None else seg[:, ::-1],
                               state_name="state_rev")  # same weights, right to left
      return forward + backward[:, ::-1], None
    if cache is None:
      return self._scan(x_BLD, seg)[0], None
    if l > 1:  # prefill from an empty cache: the chunked scan's final state seeds decoding
      out, final = self._scan(x_BLD, seg)
      _, xBC, _ = self._split(self._project(x_BLD))
      return out, {"conv": conv_tail(xBC, self.d_conv, cache["conv"].dtype), "ssm": final}
    return self._step(x_BLD, cache)

  def _step(self, x_B1D, cache):
    """One recurrent decode step: O(1) in the context length."""
    z, xBC, dt = self._split(self._project(x_B1D))
    conv, window = conv_step(cache["conv"], xBC, self.conv_kernel[...], self.conv_bias[...])
    x, B, C = self._heads(conv)
    dt_BH = jax.nn.softplus(dt[:, 0].astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    A_H = -jnp.exp(self.A_log[...].astype(jnp.float32))
    rep = self.heads // self.groups
    B_BHN, C_BHN = (jnp.repeat(t[:, 0].astype(jnp.float32), rep, axis=1) for t in (B, C))
    x_BHP = x[:, 0].astype(jnp.float32)
    h = cache["ssm"] * jnp.exp(dt_BH * A_H)[..., None, None] + jnp.einsum("bh,bhp,bhn->bhpn", dt_BH, x_BHP, B_BHN)
    y_BHP = jnp.einsum("bhpn,bhn->bhp", h, C_BHN) + self.D[...].astype(jnp.float32)[:, None] * x_BHP
    y = self._gate(rearrange(y_BHP, "b h p -> b 1 (h p)"), z)
    return self.out_proj(y.astype(self.compute_dtype)), {"conv": window, "ssm": h}


def init_cache(cfg, batch_size):
  conv_dim = cfg.ssm_inner + 2 * cfg.ssm_ngroups * cfg.d_state
  return {"conv": jnp.zeros((batch_size, cfg.d_conv - 1, conv_dim), jnp.float32),
          "ssm": jnp.zeros((batch_size, cfg.ssm_heads, cfg.ssm_headdim, cfg.d_state), jnp.float32)}


def forward_flops_per_token(cfg):
  """Matmul-like FLOPs per token of one Mamba-2 mixer forward, chunked SSD with chunk length Q.

  in/out projections and the conv, plus SSD: intra-chunk C B^T (2 Q g n) and its product with x
  (2 Q h p), the chunk state (2 h p n) and the state-to-output (2 h p n) terms.
  """
  d, di, g, n, h, p, q = (cfg.d_model, cfg.ssm_inner, cfg.ssm_ngroups, cfg.d_state, cfg.ssm_heads,
                          cfg.ssm_headdim, cfg.chunk_size)
  conv_dim = di + 2 * g * n
  proj = 2 * d * (2 * di + 2 * g * n + h) + 2 * di * d
  return proj + 2 * conv_dim * cfg.d_conv + 2 * q * (g * n + h * p) + 4 * h * p * n
