"""Masked (absorbing-state) text diffusion, MDLM-style, and block diffusion (BD3-LM), on any backbone.

Forward process: each token is independently replaced by <mask> with probability 1 - alpha(t), t in (0, 1].
The model sees the noised sequence through a bidirectional backbone and predicts the clean tokens under the
SUBS parameterisation (Sahoo et al., 2024): the mask token gets no probability and unmasked inputs are
copied. The continuous-time negative ELBO is

    NELBO(x) = integral_0^1 -alpha'(t) / (1 - alpha(t)) * E[ sum_{masked l} -log p(x_l | z_t) ] dt,

estimated with one t per sequence (or per block) drawn on [eps, 1], low-discrepancy across the batch. It
upper-bounds -log p(x), so its bits per byte bound the AR families' bpb from above on the same bytes.

Block diffusion (Arriola et al., 2025), block_size B > 0: autoregressive across blocks of B tokens and
diffusion within a block. Training feeds [noised x, clean x] with one attention mask: a noised block sees
itself and the clean blocks before it; a clean block sees the clean blocks up to itself. B = 1 is an AR
model (reading a <mask> at the predicted position), B = L is MDLM.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from altbench.archs import backbone
from altbench.archs.lm import LM
from altbench.archs.sampling import sample_logits

SCHEDULES = ("loglinear", "cosine", "linear")
SAMPLERS = ("ancestral", "confidence", "topk")
_LINEAR_SIGMA_MAX = 20.0  # "linear" is linear in sigma = -log alpha, as MDLM's LinearNoise
_NEG = -1e9


@dataclasses.dataclass(frozen=True)
class Config(backbone.Config):
  causal: bool = False          # the denoiser reads the whole (block-causal, for BD3) sequence
  schedule: str = "loglinear"   # alpha(t): loglinear 1 - t, cosine cos(pi t / 2), linear exp(-20 t)
  eps: float = 1e-3             # t is drawn from [eps, 1]
  block_size: int = 0           # 0: MDLM over the whole sequence; B > 0: BD3-LM with blocks of B tokens
  antithetic: bool = True       # stratified t across the batch (lower variance), else i.i.d.
  sample_steps: int = 64        # default denoising steps for generate()
  mask_id: int = -1             # filled from the tokenizer's <mask>
  eos_id: int = -1              # filled from the tokenizer's <eos>: documents are attention segments

  def validate(self):
    super().validate()
    if self.causal:
      raise ValueError("causal=True: the diffusion denoiser needs a bidirectional backbone (causal=False)")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r}: valid: {SCHEDULES}")
    if not 0 < self.eps < 1:
      raise ValueError(f"eps={self.eps}: must be in (0, 1)")
    if self.block_size < 0:
      raise ValueError(f"block_size={self.block_size}: must be >= 0 (0 = MDLM)")
    if self.block_size and set(self.pattern) != {"A"}:
      raise ValueError(f"pattern={self.pattern!r}: block diffusion's block-causal mask needs attention blocks only")
    if self.sample_steps < 1:
      raise ValueError(f"sample_steps={self.sample_steps}: must be positive")


def build(cfg, rngs):
  for name in ("vocab_size", "mask_id", "eos_id"):
    if getattr(cfg, name) < 0 or (name == "vocab_size" and cfg.vocab_size == 0):
      raise ValueError(f"{name}={getattr(cfg, name)}: must be set (the loop fills it from the tokenizer)")
  if not 0 <= cfg.mask_id < cfg.vocab_size:
    raise ValueError(f"mask_id={cfg.mask_id}: must be a token id below vocab_size={cfg.vocab_size}")
  cfg.validate()
  return LM(cfg, rngs)


def alpha(schedule, t):
  """(alpha(t), alpha'(t)): probability a token is still clean at time t, and its derivative."""
  if schedule == "loglinear":
    return 1.0 - t, -jnp.ones_like(t)
  if schedule == "cosine":
    return jnp.cos(0.5 * math.pi * t), -0.5 * math.pi * jnp.sin(0.5 * math.pi * t)
  a = jnp.exp(-_LINEAR_SIGMA_MAX * t)
  return a, -_LINEAR_SIGMA_MAX * a


def nelbo_weight(schedule, t):
  """-alpha'(t) / (1 - alpha(t)), the weight of a masked token's cross-entropy at time t."""
  a, da = alpha(schedule, t)
  return -da / jnp.maximum(1.0 - a, 1e-12)


def subs_log_probs(logits_BLV, z_BL, mask_id):
  """SUBS: no probability on <mask>; a position whose input is not masked copies its input."""
  logits_BLV = logits_BLV.at[..., mask_id].set(_NEG)
  log_probs = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  copy = jnp.where(jax.nn.one_hot(z_BL, logits_BLV.shape[-1], dtype=bool), 0.0, _NEG)
  return jnp.where((z_BL == mask_id)[..., None], log_probs, copy)


def draw_times(rng, shape, eps, antithetic):
  """t on [eps, 1]; antithetic: one uniform offset, evenly spaced over all entries (low discrepancy)."""
  n = math.prod(shape)
  if antithetic:
    u = (jax.random.uniform(rng, ()) + jnp.arange(n) / n) % 1.0
    u = jax.random.permutation(jax.random.fold_in(rng, 1), u)
  else:
    u = jax.random.uniform(rng, (n,))
  return (eps + (1 - eps) * u).reshape(shape)


def _segments(cfg, x_BL):
  return jnp.cumsum(x_BL == cfg.eos_id, axis=1).astype(jnp.int32)


def bd3_mask(length, block):
  """(2L, 2L) visibility for [noised x, clean x]: noised block i sees noised block i and clean blocks < i;
  clean block i sees clean blocks <= i."""
  blk = jnp.arange(length) // block
  same, before = blk[:, None] == blk[None, :], blk[:, None] > blk[None, :]
  upto = same | before
  top = jnp.concatenate([same, before], axis=1)
  bottom = jnp.concatenate([jnp.zeros_like(same), upto], axis=1)
  return jnp.concatenate([top, bottom], axis=0)


def nelbo_terms(model, cfg, x_BL, valid_BL, t_BN, u_BL):
  """Per-token weighted NELBO terms (b, l) for clean x, times t per block (b, n_blocks) and uniforms u.

  A valid token is masked where u < 1 - alpha(t of its block). MDLM is the case n_blocks = 1 without the
  clean half (block_size 0). Returns (terms_BL, logits_BLV, z_BL).
  """
  b, l = x_BL.shape
  block = cfg.block_size or l
  t_BL = jnp.repeat(t_BN, block, axis=1)[:, :l]
  a_BL, _ = alpha(cfg.schedule, t_BL)
  masked_BL = (u_BL < 1.0 - a_BL) & (valid_BL > 0)
  z_BL = jnp.where(masked_BL, cfg.mask_id, x_BL)
  seg_BL = _segments(cfg, x_BL)
  if cfg.block_size:
    if l % block:
      raise ValueError(f"block_size={block} must divide the sequence length {l}")
    positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(l), jnp.arange(l)]), (b, 2 * l))
    logits, _ = model(jnp.concatenate([z_BL, x_BL], axis=1), positions,
                      jnp.concatenate([seg_BL, seg_BL], axis=1), attn_mask=bd3_mask(l, block))
    logits = logits[:, :l]
  else:
    logits, _ = model(z_BL, segment_ids_BL=seg_BL)
  log_probs = subs_log_probs(logits, z_BL, cfg.mask_id)
  nll_BL = -jnp.take_along_axis(log_probs, x_BL[..., None], axis=-1)[..., 0]
  # Unbiased for the integral over [eps, 1]: t is uniform there, so scale the mean by its length.
  terms = (1 - cfg.eps) * nelbo_weight(cfg.schedule, t_BL) * jnp.where(masked_BL, nll_BL, 0.0)
  return terms, logits, z_BL


def loss(model, batch, rng):
  """NELBO per token on the same target bytes the AR families score; metrics give the bpb bound."""
  cfg = model.cfg
  x_BL, valid_BL = batch["targets"], batch["loss_mask"].astype(jnp.float32)
  b, l = x_BL.shape
  n_blocks = -(-l // cfg.block_size) if cfg.block_size else 1
  rng_t, rng_u = jax.random.split(rng)
  t_BN = draw_times(rng_t, (b, n_blocks), cfg.eps, cfg.antithetic)
  terms_BL, _, _ = nelbo_terms(model, cfg, x_BL, valid_BL, t_BN, jax.random.uniform(rng_u, (b, l)))
  n_tokens = jnp.sum(valid_BL)
  nats = jnp.sum(terms_BL)
  metrics = {"nats": nats, "tokens": n_tokens, "bytes": jnp.sum(batch["nbytes"] * valid_BL)}
  return nats / jnp.maximum(n_tokens, 1.0), metrics


def flops_per_token(cfg, seq_len):
  """Training FLOPs per token; block diffusion runs the backbone on twice the length (noised + clean)."""
  factor = 2 if cfg.block_size else 1
  fwd = factor * backbone.forward_flops_per_token(cfg, factor * seq_len) + 2 * cfg.d_model * cfg.vocab_size
  return 3 * fwd


# ---------------------------------------------------------------- sampling


def generate(model, prompt_BT, max_new_tokens, rng, *, temperature=1.0, top_k=0, top_p=1.0, steps=None,
             sampler="ancestral", block_length=0, remask_noise=0.5):
  """Continue prompts by max_new_tokens tokens; returns (b, T + new) ids with no <mask> left."""
  prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
  b, t = prompt_BT.shape
  canvas = jnp.concatenate([prompt_BT, jnp.full((b, max_new_tokens), model.cfg.mask_id, jnp.int32)], axis=1)
  fixed = jnp.arange(t + max_new_tokens)[None] < t
  out, _ = infill(model, canvas, jnp.broadcast_to(fixed, canvas.shape), rng, temperature=temperature,
                  top_k=top_k, top_p=top_p, steps=steps, sampler=sampler, block_length=block_length,
                  remask_noise=remask_noise)
  return out


def infill(model, canvas_BL, fixed_BL, rng, *, temperature=1.0, top_k=0, top_p=1.0, steps=None,
           sampler="ancestral", block_length=0, remask_noise=0.5):
  """Fill every non-fixed position of canvas; returns (tokens (b, l), number of model calls).

  sampler "ancestral": the reverse process over `steps` uniform time steps; a masked token is revealed
    between t and s with probability (alpha(s) - alpha(t)) / (1 - alpha(t)), and when a step reveals
    nothing the previous logits are reused (MDLM's caching trick, no model call).
  sampler "confidence": LLaDA-style; each step reveals the masked positions whose drawn token the model is
    most sure of, the same number each step.
  sampler "topk": easy-first top-k with re-masking (Ye et al. 2025, HKUNLP/diffusion-vs-ar,
    src/llmtuner/tuner/mdm/trainer.py `topk_decoding`, "stochastic0.5-linear"): after step j of n, the
    floor(N (n - 1 - j) / n) generated positions with the lowest scores stay (or become again) masked and the
    rest take their drawn token; a masked position scores the log-probability of its draw, a revealed one 0
    (SUBS copies it), plus Gumbel noise of scale remask_noise * (n - 1 - j) / n. So, unlike "confidence", a
    revealed token can be masked again and redrawn. Theirs re-predicts revealed positions instead of copying.
  block_length > 0: semi-autoregressive, block after block left to right, `steps` split over the blocks.
  Block diffusion models (block_size > 0) always go block by block with block_length = block_size.
  """
  cfg = model.cfg
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler={sampler!r}: valid: {SAMPLERS}")
  steps = steps or cfg.sample_steps
  block_length = cfg.block_size or block_length
  graphdef, state = nnx.split(model)
  tokens, calls = _infill(graphdef, state, jnp.asarray(canvas_BL, jnp.int32), jnp.asarray(fixed_BL, bool), rng,
                          steps, sampler, block_length, float(temperature), int(top_k), float(top_p),
                          float(remask_noise))
  return tokens, int(calls)


@jax.jit(static_argnums=(0, 5, 6, 7, 8, 9, 10, 11))
def _infill(graphdef, state, canvas_BL, fixed_BL, rng, steps, sampler, block_length, temperature, top_k, top_p,
            remask_noise):
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
  b, l = canvas_BL.shape
  z = jnp.where(fixed_BL, canvas_BL, cfg.mask_id)
  n_blocks = -(-l // block_length) if block_length else 1
  per_block = max(1, -(-steps // n_blocks))

  def denoise(z):
    seg = _segments(cfg, z)
    if cfg.block_size:  # finished blocks are clean context, block-causal as in training
      positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(l), jnp.arange(l)]), (b, 2 * l))
      logits, _ = model(jnp.concatenate([z, z], 1), positions, jnp.concatenate([seg, seg], 1),
                        attn_mask=bd3_mask(l, cfg.block_size))
      logits = logits[:, :l]
    else:
      logits, _ = model(z, segment_ids_BL=seg)
    return subs_log_probs(logits, z, cfg.mask_id)

  def draw(log_probs, key):
    flat = log_probs.reshape(b * l, -1)
    x = sample_logits(flat, key, temperature=temperature, top_k=top_k, top_p=top_p).reshape(b, l)
    conf = jnp.take_along_axis(log_probs, x[..., None], -1)[..., 0]
    return x, conf

  def step(carry, i):
    z, log_probs, dirty, calls, key = carry
    key, k_draw, k_reveal = jax.random.split(key, 3)
    blk, j = i // per_block, i % per_block
    in_block = (jnp.arange(l) // (block_length or l) == blk)[None] if block_length else jnp.ones((1, l), bool)
    log_probs, calls = jax.lax.cond(dirty, lambda: (denoise(z), calls + 1), lambda: (log_probs, calls))
    x, conf = draw(log_probs, k_draw)
    masked = (z == cfg.mask_id) & in_block
    t_now, t_next = 1.0 - j / per_block, 1.0 - (j + 1) / per_block
    if sampler == "ancestral":
      a_t, _ = alpha(cfg.schedule, t_now)
      a_s, _ = alpha(cfg.schedule, t_next)
      p = jnp.where(j + 1 == per_block, 1.0, (a_s - a_t) / jnp.maximum(1.0 - a_t, 1e-12))
      reveal = masked & (jax.random.uniform(k_reveal, (b, l)) < p)
    elif sampler == "topk":
      free = ~fixed_BL & in_block
      rate = (per_block - 1 - j) / per_block
      keep = jnp.floor(jnp.sum(free, axis=1, keepdims=True) * rate).astype(jnp.int32)
      gumbel = -jnp.log(-jnp.log(jax.random.uniform(k_reveal, (b, l)) + 1e-8) + 1e-8)
      score = jnp.where(free, jnp.where(masked, conf, 0.0) + remask_noise * rate * gumbel, jnp.inf)
      remask = free & (jnp.argsort(jnp.argsort(score, axis=1), axis=1) < keep)
      new = jnp.where(remask, cfg.mask_id, jnp.where(masked, x, z))
      return (new, log_probs, jnp.any(new != z), calls, key), None
    else:
      remaining = jnp.sum(masked, axis=1, keepdims=True)
      k = jnp.ceil(remaining / (per_block - j)).astype(jnp.int32)
      score = jnp.where(masked, conf, -jnp.inf)
      rank = jnp.argsort(jnp.argsort(-score, axis=1), axis=1)
      reveal = masked & (rank < k)
    z = jnp.where(reveal, x, z)
    return (z, log_probs, jnp.any(reveal), calls, key), None

  init_lp = jnp.zeros((b, l, cfg.vocab_size), jnp.float32)
  (z, _, _, calls, _), _ = jax.lax.scan(step, (z, init_lp, jnp.array(True), jnp.array(0), rng),
                                        jnp.arange(per_block * n_blocks))
  return z, calls
