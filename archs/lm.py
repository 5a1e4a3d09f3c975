"""Autoregressive language model over any backbone pattern ("AAAA" is the transformer baseline).

The simplest family: the archs.Family contract (Config, build, loss, generate, flops_per_token) and nothing else.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from altbench.archs import backbone
from altbench.archs.layers import normal
from altbench.archs.sampling import sample_logits

Config = backbone.Config  # the AR objective adds no fields to the backbone's


class LM(nnx.Module):
  """Token embedding -> backbone -> output head (or the tied embedding)."""

  def __init__(self, cfg, rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                           embedding_init=normal(cfg.init_std), rngs=rngs)
    self.backbone = backbone.Backbone(cfg, rngs)
    self.head = None if cfg.tie_embeddings else nnx.Linear(
        cfg.d_model, cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        kernel_init=normal(cfg.init_std), rngs=rngs)

  def logits(self, h_BLD):
    out = self.embed.attend(h_BLD) if self.head is None else self.head(h_BLD)
    out = out.astype(jnp.float32)
    return out if self.cfg.logits_multiplier == 1.0 else out * self.cfg.logits_multiplier

  def embed_tokens(self, tokens_BL):
    x_BLD = self.embed(tokens_BL)
    return x_BLD if self.cfg.embed_multiplier == 1.0 else x_BLD * self.cfg.embed_multiplier

  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, cache=None, cache_index=None, attn_mask=None):
    """Logits (b, l, vocab) in float32 and the updated decode cache (None without one)."""
    if positions_BL is None:
      start = 0 if cache_index is None else cache_index
      positions_BL = jnp.broadcast_to(start + jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    h_BLD, cache = self.backbone(self.embed_tokens(tokens_BL), positions_BL, segment_ids_BL, cache, cache_index,
                                 attn_mask)
    return self.logits(h_BLD), cache


def build(cfg, rngs):
  if cfg.vocab_size <= 0:
    raise ValueError(f"vocab_size={cfg.vocab_size}: must be set (the loop fills it from the tokenizer)")
  cfg.validate()
  return LM(cfg, rngs)


def token_nll(logits_BLV, targets_BL, mask_BL):
  """Per-token negative log-likelihood in nats (float32), zero where mask is 0."""
  nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32), targets_BL)
  return nll_BL * mask_BL


def loss(model, batch, rng):
  """Mean next-token cross-entropy over loss_mask; metrics carry the sums eval turns into bits per byte."""
  del rng  # the AR objective draws no noise
  logits_BLV, _ = model(batch["inputs"], segment_ids_BL=batch.get("segment_ids"))  # none: a document per row
  mask_BL = batch["loss_mask"].astype(jnp.float32)
  nll_BL = token_nll(logits_BLV, batch["targets"], mask_BL)
  n_tokens = jnp.sum(mask_BL)
  correct = jnp.sum((jnp.argmax(logits_BLV, -1) == batch["targets"]) * mask_BL)
  metrics = {"nats": jnp.sum(nll_BL), "tokens": n_tokens, "bytes": jnp.sum(batch["nbytes"] * mask_BL),
             "correct": correct}
  return jnp.sum(nll_BL) / jnp.maximum(n_tokens, 1.0), metrics


def flops_per_token(cfg, seq_len):
  """Training FLOPs per token: forward (backbone + output head) times 3 for forward + backward."""
  return 3 * (backbone.forward_flops_per_token(cfg, seq_len) + 2 * cfg.d_model * cfg.vocab_size)


def generate(model, prompt_BT, max_new_tokens, rng, *, temperature=1.0, top_k=0, top_p=1.0):
  """Continue equal-length prompts by max_new_tokens tokens with a KV cache; returns (b, T + new) ids."""
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_BT, jnp.int32), rng, max_new_tokens,
                   float(temperature), int(top_k), float(top_p))


@jax.jit(static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, state, prompt_BT, rng, max_new_tokens, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  b, t = prompt_BT.shape
  cache = backbone.init_cache(model.cfg, b, t + max_new_tokens)
  logits_BTV, cache = model(prompt_BT, cache=cache, cache_index=0)
  draw = lambda logits, key: sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
  keys = jax.random.split(rng, max_new_tokens)
  first = draw(logits_BTV[:, -1], keys[0])

  def step(carry, key):
    token_B, cache, index = carry
    logits_B1V, cache = model(token_B[:, None], cache=cache, cache_index=index)
    nxt = draw(logits_B1V[:, 0], key)
    return (nxt, cache, index + 1), token_B

  (last, _, _), tokens_NB = jax.lax.scan(step, (first, cache, t), keys[1:])
  return jnp.concatenate([prompt_BT, tokens_NB.T, last[:, None]], axis=1)
