"""Recurrent depth (Geiping et al., 2025, "Scaling up Test-Time Compute with Latent Reasoning", Huginn).

The block stack of `pattern` is split into a prelude (the first `prelude` blocks), a core (the middle) and
a coda (the last `coda` blocks). The prelude embeds the input once, e = P(x); the core is iterated r times
on a state with input injection,

    s_0 ~ N(0, state_std^2),   s_i = R(adapter([norm(s_{i-1}), e])),   logits = head(final_norm(C(s_r)))

where the adapter is a (2d -> d) linear map and norm an RMSNorm that keeps the state's scale fixed however
many times the core runs (Huginn gets the same from its sandwich norms). With r = 1 and an adapter that
passes e through ([0, I]), the model is the plain stack of `pattern` (archs.lm with the same weights: the
module tree is LM's plus `adapter` and `state_norm`).

Training: r per step from a log-normal Poisson, tau ~ N(log(mean_iters) - sigma^2 / 2, sigma),
r = min(Poisson(exp(tau)) + 1, max_iters), or r = mean_iters every step with fixed_iters (a looped transformer,
Saunshi et al. 2025: prelude = coda = 0, backprop_iters = r, state_std = 0 gives a block looped exactly r times
with full backprop, its input re-injected through the adapter at every iteration); truncated backprop: the first r - k iterations run under
stop_gradient in a while_loop, the last k = backprop_iters in a scan (a step with r < k masks the first
k - r scan iterations, which are still computed). Test time (eval_loss, generate): r = test_iters, chosen
freely; with exit_kl > 0 a position stops iterating once the KL divergence between the next-token
distributions of two successive iterations falls below exit_kl (test_iters is then the cap).

The test-time loop at a fixed r exists once, in run_fixed (model(), eval_loss and generate reach it through
run_test): it runs through archs.hooks.loop("core", ...), so interp.capture names each iteration's
activations, and takes `intervene(i, s)`, which sees the state after iteration i + 1 and returns the one the
next iteration reads; interp reads and replaces states there.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altbench.archs import backbone, hooks, lm
from altbench.archs.coconut import answer_metrics
from altbench.archs.layers import RMSNorm, normal
from altbench.archs.sampling import sample_logits


@dataclasses.dataclass(frozen=True)
class Config(backbone.Config):
  prelude: int = 1            # blocks of `pattern` before the core
  coda: int = 1               # blocks after it; the core is pattern[prelude:len(pattern) - coda]
  mean_iters: float = 4.0     # training r: Poisson(exp(tau)) + 1, tau ~ N(log(mean_iters) - sigma^2/2, sigma)
  iters_sigma: float = 0.5
  max_iters: int = 16         # cap on the sampled r
  backprop_iters: int = 2     # k: gradients flow through the last k core iterations only
  test_iters: int = 0         # r at eval and generate (0: round(mean_iters) + 1, the training mean)
  exit_kl: float = 0.0        # > 0: adaptive exit at test time, when successive iterations' KL < exit_kl
  state_std: float = 1.0      # s_0 ~ N(0, state_std^2); 0: zeros
  fixed_iters: bool = False   # True: training r = mean_iters (an integer) every step, not sampled; test r too

  @property
  def core_pattern(self):
    return self.pattern[self.prelude:len(self.pattern) - self.coda]

  @property
  def iters_at_test(self):
    return self.test_iters or int(round(self.mean_iters)) + (0 if self.fixed_iters else 1)

  def validate(self):
    super().validate()
    if not self.causal:
      raise ValueError("causal=False: the recurrent-depth family is an autoregressive LM")
    if self.prelude < 0 or self.coda < 0 or not self.core_pattern:
      raise ValueError(f"prelude={self.prelude}, coda={self.coda}: must leave a non-empty core of "
                       f"pattern={self.pattern!r}")
    if self.mean_iters < 1 or self.iters_sigma < 0 or self.max_iters < 1 or self.backprop_iters < 1:
      raise ValueError(f"mean_iters={self.mean_iters}, iters_sigma={self.iters_sigma}, max_iters={self.max_iters}, "
                       f"backprop_iters={self.backprop_iters}: need mean_iters >= 1, sigma >= 0, max_iters >= 1, "
                       "backprop_iters >= 1")
    if self.fixed_iters and (self.mean_iters != int(self.mean_iters) or self.mean_iters > self.max_iters):
      raise ValueError(f"fixed_iters=True, mean_iters={self.mean_iters}, max_iters={self.max_iters}: the fixed r is "
                       "mean_iters, which must be an integer <= max_iters")
    if self.test_iters < 0 or self.exit_kl < 0 or self.state_std < 0:
      raise ValueError(f"test_iters={self.test_iters}, exit_kl={self.exit_kl}, state_std={self.state_std}: "
                       "must be >= 0")


class Recurrent(lm.LM):
  """LM's embedding, block stack and head, plus the core's input adapter and state norm."""

  def __init__(self, cfg, rngs):
    super().__init__(cfg, rngs)  # built first, so the shared modules draw the same initial weights as lm.LM
    self.adapter = nnx.Linear(2 * cfg.d_model, cfg.d_model, use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype, kernel_init=normal(cfg.init_std), rngs=rngs)
    self.state_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)

  def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, cache=None, cache_index=None, attn_mask=None):
    """Test-time log-probs (b, l, vocab) at r = iters_at_test from a fixed random state, and None (no cache:
    the core's positions may run different depths). LM's signature, so tools that call a model work."""
    if cache is not None or attn_mask is not None or positions_BL is not None:
      raise ValueError("recurrent depth has no decode cache, positions or attention mask; generate() recomputes")
    x = self.embed_tokens(tokens_BL)
    s0 = initial_state(self.cfg, jax.random.key(0), x.shape)
    return run_test(self, x, self.cfg.iters_at_test, s0, segment_ids_BL, self.cfg.exit_kl)[0], None

  def _blocks(self, lo, hi, x, pos, seg):
    for block in list(self.backbone.blocks)[lo:hi]:
      x, _ = block(x, pos, seg)
    return x

  def prelude(self, x_BLD, pos, seg):
    return self._blocks(0, self.cfg.prelude, x_BLD, pos, seg)

  def core(self, s_BLD, e_BLD, pos, seg):
    x = self.adapter(jnp.concatenate([self.state_norm(s_BLD), e_BLD.astype(self.cfg.compute_dtype)], axis=-1))
    return self._blocks(self.cfg.prelude, len(self.cfg.pattern) - self.cfg.coda, x, pos, seg)

  def coda(self, s_BLD, pos, seg):
    h = self._blocks(len(self.cfg.pattern) - self.cfg.coda, len(self.cfg.pattern), s_BLD, pos, seg)
    return self.logits(self.backbone.final_norm(h))


def build(cfg, rngs):
  if cfg.vocab_size <= 0:
    raise ValueError(f"vocab_size={cfg.vocab_size}: must be set (the loop fills it from the tokenizer)")
  cfg.validate()
  return Recurrent(cfg, rngs)


def sample_iters(cfg, rng):
  """Training r (int32 scalar): Poisson with a log-normal rate, plus one, capped at max_iters (fixed_iters:
  mean_iters)."""
  if cfg.fixed_iters:
    return jnp.int32(int(cfg.mean_iters))
  k_tau, k_r = jax.random.split(rng)
  tau = math.log(cfg.mean_iters) - 0.5 * cfg.iters_sigma ** 2 + cfg.iters_sigma * jax.random.normal(k_tau)
  r = jax.random.poisson(k_r, jnp.exp(tau)) + 1
  return jnp.clip(r, 1, cfg.max_iters).astype(jnp.int32)


def iterate(model, s_BLD, e_BLD, r, pos, seg=None):
  """The core run r times from s (r may be traced); gradients flow through the last backprop_iters only."""
  k = model.cfg.backprop_iters
  n_grad = jnp.minimum(r, k)
  n_free = r - n_grad
  graphdef, state = nnx.split(model)
  frozen = nnx.merge(graphdef, jax.lax.stop_gradient(state))  # the free iterations see constant weights
  e_free = jax.lax.stop_gradient(e_BLD)
  s_free = jax.lax.fori_loop(0, n_free, lambda i, s: frozen.core(s, e_free, pos, seg), jax.lax.stop_gradient(s_BLD))
  s_BLD = jnp.where(n_free > 0, s_free, s_BLD)  # no free iteration: s_0 itself (and its gradient) goes on

  def step(s, j):
    return jnp.where(j >= k - n_grad, model.core(s, e_BLD, pos, seg), s), None

  s_BLD, _ = jax.lax.scan(step, s_BLD, jnp.arange(k))
  return s_BLD


def initial_state(cfg, rng, shape):
  if cfg.state_std == 0:
    return jnp.zeros(shape, cfg.compute_dtype)
  return (cfg.state_std * jax.random.normal(rng, shape, jnp.float32)).astype(cfg.compute_dtype)


def _pos(b, l):
  return jnp.broadcast_to(jnp.arange(l), (b, l))


def forward_embeddings(model, x_BLD, r, s0_BLD, segment_ids_BL=None):
  """Training forward from input embeddings: logits (b, l, vocab) after r core iterations (truncated backprop)."""
  b, l, _ = x_BLD.shape
  pos = _pos(b, l)
  e = model.prelude(x_BLD, pos, segment_ids_BL)
  return model.coda(iterate(model, s0_BLD, e, r, pos, segment_ids_BL), pos, segment_ids_BL)


def run_fixed(model, x_BLD, iters, s0_BLD, segment_ids_BL=None, intervene=None):
  """Test-time forward at exactly `iters` core iterations (iters may be traced): (the coda's logits (b, l,
  vocab), the final state). intervene(i, s_BLD) -> s_BLD: called with the state after iteration i + 1, returns
  the state the next iteration (or the coda) reads."""
  b, l, _ = x_BLD.shape
  pos = _pos(b, l)
  e = model.prelude(x_BLD, pos, segment_ids_BL)

  def one(s, i):
    s = model.core(s, e, pos, segment_ids_BL)
    return s if intervene is None else intervene(i, s)

  s = hooks.loop("core", one, s0_BLD, iters)
  return model.coda(s, pos, segment_ids_BL), s


def run_test(model, x_BLD, iters, s0_BLD, segment_ids_BL=None, exit_kl=0.0, watch_BL=None):
  """Test-time forward: (log-probs, iterations per position (b, l)). With exit_kl > 0 a position freezes its
  state once KL(p_i || p_{i-1}) < exit_kl; with watch_BL (generation) a whole row freezes once the KL at its
  watched position does. Either way at most `iters` iterations."""
  b, l, _ = x_BLD.shape
  if isinstance(exit_kl, (int, float)) and exit_kl <= 0:  # (a traced threshold takes the adaptive path)
    logits, _ = run_fixed(model, x_BLD, iters, s0_BLD, segment_ids_BL)
    return jax.nn.log_softmax(logits, -1), jnp.full((b, l), iters, jnp.int32)
  pos = _pos(b, l)
  e = model.prelude(x_BLD, pos, segment_ids_BL)
  logp0 = jax.nn.log_softmax(model.coda(s0_BLD, pos, segment_ids_BL), -1)

  def cond(c):
    i, _, _, done, _ = c
    return (i < iters) & ~jnp.all(done)

  def body(c):
    i, s, logp, done, count = c
    s_new = model.core(s, e, pos, segment_ids_BL)
    logp_new = jax.nn.log_softmax(model.coda(s_new, pos, segment_ids_BL), -1)
    converged = jnp.sum(jnp.exp(logp_new) * (logp_new - logp), -1) < exit_kl
    if watch_BL is not None:
      converged = jnp.broadcast_to(jnp.any(watch_BL & converged, axis=1, keepdims=True), converged.shape)
    s = jnp.where(done[..., None], s, s_new)
    logp = jnp.where(done[..., None], logp, logp_new)
    count = count + (~done).astype(jnp.int32)
    return i + 1, s, logp, done | converged, count

  init = (0, s0_BLD, logp0, jnp.zeros((b, l), bool), jnp.zeros((b, l), jnp.int32))
  _, _, logp, _, count = jax.lax.while_loop(cond, body, init)
  return logp, count


def _metrics(logits_BLV, batch):
  mask_BL = batch["loss_mask"].astype(jnp.float32)
  nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch["targets"]) * mask_BL
  n_tokens = jnp.sum(mask_BL)
  metrics = {"nats": jnp.sum(nll_BL), "tokens": n_tokens, "bytes": jnp.sum(batch["nbytes"] * mask_BL),
             **answer_metrics(logits_BLV, batch["targets"], mask_BL)}
  return jnp.sum(nll_BL) / jnp.maximum(n_tokens, 1.0), metrics


def loss(model, batch, rng):
  """Training loss at a sampled r (metric "iters": r times the scored tokens, so iters / tokens is the mean)."""
  k_r, k_s = jax.random.split(rng)
  x = model.embed_tokens(batch["inputs"])
  r = sample_iters(model.cfg, k_r)
  logits = forward_embeddings(model, x, r, initial_state(model.cfg, k_s, x.shape), batch["segment_ids"])
  value, metrics = _metrics(logits, batch)
  return value, {**metrics, "iters": r * metrics["tokens"]}


def eval_loss(model, batch, rng):
  """Held-out loss at r = test_iters (adaptive exit when exit_kl > 0); "iters" sums iterations over scored tokens."""
  x = model.embed_tokens(batch["inputs"])
  s0 = initial_state(model.cfg, rng, x.shape)
  logits, count = run_test(model, x, model.cfg.iters_at_test, s0, batch["segment_ids"], model.cfg.exit_kl)
  value, metrics = _metrics(logits, batch)
  return value, {**metrics, "iters": jnp.sum(count * batch["loss_mask"])}


def _expected_free_iters(cfg, n=20000):
  """E[max(r - k, 0)] under the training distribution of r (fixed-seed Monte Carlo, deterministic)."""
  if cfg.fixed_iters:
    return float(max(int(cfg.mean_iters) - cfg.backprop_iters, 0))
  rng = np.random.default_rng(0)
  tau = math.log(cfg.mean_iters) - 0.5 * cfg.iters_sigma ** 2 + cfg.iters_sigma * rng.standard_normal(n)
  r = np.clip(rng.poisson(np.exp(tau)) + 1, 1, cfg.max_iters)
  return float(np.maximum(r - cfg.backprop_iters, 0).mean())


def flops_per_token(cfg, seq_len):
  """Training FLOPs per token: prelude, coda and head forward + backward; the k backprop iterations forward +
  backward (all k computed, masked when r < k); the free iterations forward only, at their expected number."""
  part = lambda pattern: backbone.forward_flops_per_token(dataclasses.replace(cfg, pattern=pattern), seq_len)
  n = len(cfg.pattern)
  core = part(cfg.core_pattern) + 2 * 2 * cfg.d_model * cfg.d_model  # + the adapter
  outer = part(cfg.pattern[:cfg.prelude]) if cfg.prelude else 0
  outer += (part(cfg.pattern[n - cfg.coda:]) if cfg.coda else 0) + 2 * cfg.d_model * cfg.vocab_size
  return 3 * outer + 3 * cfg.backprop_iters * core + _expected_free_iters(cfg) * core


# ---------------------------------------------------------------- sampling


def generate(model, prompt_BT, max_new_tokens, rng, *, temperature=1.0, top_k=0, top_p=1.0, iters=None,
             exit_kl=None, return_iters=False):
  """Continue equal-length prompts by max_new_tokens tokens at r = iters (default test_iters), recomputing the
  sequence for every token (no cache: with adaptive exit the positions run different depths). With exit_kl the
  iteration stops per row once the newest position's KL falls below it. return_iters: also (b, new) counts."""
  cfg = model.cfg
  graphdef, state = nnx.split(model)
  tokens, counts = _generate(graphdef, state, jnp.asarray(prompt_BT, jnp.int32), rng, int(max_new_tokens),
                             int(iters or cfg.iters_at_test), float(cfg.exit_kl if exit_kl is None else exit_kl),
                             float(temperature), int(top_k), float(top_p))
  return (tokens, counts) if return_iters else tokens


@jax.jit(static_argnums=(0, 4, 5, 6, 7, 8, 9))
def _generate(graphdef, state, prompt_BT, rng, max_new_tokens, iters, exit_kl, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  b, t = prompt_BT.shape
  total = t + max_new_tokens
  buf = jnp.concatenate([prompt_BT, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
  s0 = initial_state(model.cfg, jax.random.fold_in(rng, 1), (b, total, model.cfg.d_model))
  keys = jax.random.split(rng, max_new_tokens)

  def step(buf, xs):
    i, key = xs
    cur = t + i - 1  # the position whose output predicts the next token
    watch = jnp.broadcast_to(jnp.arange(total) == cur, (b, total))
    logits, count = run_test(model, model.embed_tokens(buf), iters, s0, None, exit_kl, watch)
    nxt = sample_logits(logits[:, cur], key, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None].astype(jnp.int32), cur + 1, 1), count[:, cur]

  buf, counts = jax.lax.scan(step, buf, (jnp.arange(max_new_tokens), keys))
  return buf, counts.T
