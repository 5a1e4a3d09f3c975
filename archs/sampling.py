"""Drawing tokens from logits: greedy, temperature, top-k and top-p (nucleus), shared by every family."""

import jax
import jax.numpy as jnp


def sample_logits(logits_BV, rng, *, temperature=1.0, top_k=0, top_p=1.0):
  """One token id per row. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
    keep = (cum_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1)
