"""Decode speed: tokens per second of a family's own decoder, and per-token cost of an `lm` against context.

The arena reports both for each entry; `experiments/bench/decode.py` prints the context curve of Mamba-2
against the transformer.
"""

import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from altbench.archs import backbone, lm


def decode_speed(family, model, corpus, n_prompts, new_tokens):
  """Generated tokens per second with the family's own decoder (a first call compiles, the second is timed)."""
  prompts = corpus.prompts(n_prompts)
  family.generate(model, prompts, new_tokens, jax.random.key(0))  # compile
  t0 = time.perf_counter()
  jax.block_until_ready(family.generate(model, prompts, new_tokens, jax.random.key(1)))
  return prompts.shape[0] * new_tokens / (time.perf_counter() - t0)


def time_decode(cfg, contexts, steps, repeats):
  """Median seconds per single-token decode step of an `lm` model of config cfg (random weights: the cost does
  not depend on them) after a prefill of each context; rounds alternate between contexts so load is shared."""
  model = lm.build(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, tokens, cache):
    return nnx.merge(graphdef, state)(tokens, cache=cache, cache_index=0)

  @jax.jit
  def decode(state, token, cache, index):
    logits, cache = nnx.merge(graphdef, state)(token, cache=cache, cache_index=index)
    return jnp.argmax(logits[:, -1], -1)[:, None], cache

  runs = {}
  for context in contexts:
    cache = backbone.init_cache(cfg, 1, context + steps * (repeats + 1))
    logits, cache = prefill(state, jax.random.randint(jax.random.key(0), (1, context), 0, 256), cache)
    token, cache = decode(state, jnp.argmax(logits[:, -1], -1)[:, None], cache, context)  # compile
    runs[context] = [token, cache, context + 1, []]
  jax.block_until_ready(runs)
  for _ in range(repeats):
    for context, run in runs.items():
      token, cache, index, times = run
      t0 = time.perf_counter()
      for i in range(steps):
        token, cache = decode(state, token, cache, index + i)
      jax.block_until_ready(token)
      times.append((time.perf_counter() - t0) / steps)
      run[:3] = token, cache, index + steps
  return {context: statistics.median(run[3]) for context, run in runs.items()}


def decode_curve(model_cfg, contexts, steps):
  """{context: tokens/s} of single-token decoding after a prefill of `context` tokens."""
  seconds = time_decode(model_cfg, list(contexts), steps, repeats=2)
  return {str(c): 1.0 / s for c, s in seconds.items()}
