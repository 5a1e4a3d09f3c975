"""Coconut: chain of continuous thought (Hao et al., 2024, arXiv:2412.06769) on any causal backbone.

The language model is archs.lm's LM, unchanged (no new parameters). A row reads

    question <bot> [thought] x k <eot> remaining steps #answer <eos>

and each thought position's input embedding is the model's last hidden state at the position before it:
the first thought reads the hidden state at <bot>, the second the one at the first thought, and so on. The
hidden state used is the backbone's output after the final RMSNorm, i.e. exactly what the output head reads.
Why: it is what Coconut feeds back (Hugging Face GPT-2's last hidden state is taken after ln_f), and in a
pre-norm stack the un-normed residual stream grows with depth and has no fixed scale, while the normed
state has a fixed RMS (times the learned final-norm scale) whatever the depth or the training step.

Thought positions are marked in the data by the <mask> placeholder (train/reasoning_tasks.py, mode
"coconut"; the curriculum stage, c and the max stage are data fields, the stage derived from the step).
Loss falls on the remaining language steps and the answer only (the data's loss_mask).

Training needs k + 1 sequential passes, all inside one jit:
  prefix_len = 0: recompute the whole sequence once per thought (a fori_loop of k full forward passes, each
    filling the next thought, then the scored pass): k + 1 full passes, any layout (thoughts anywhere).
  prefix_len = P > 0: every row has <bot> at index P - 1 (the reasoning tasks' left-padded layout). One
    prefill of the P prefix tokens fills a KV cache (or Mamba state); a fori_loop of k one-token decode
    steps computes the thoughts from it; one full forward pass over the filled embeddings gives the logits.
    About (P + L) / L full passes plus k single tokens; gradients flow through the cache and every step.
A batch whose thoughts do not fit the chosen layout (more than k per row, or outside [P, P + k)) gets a NaN
loss, so the loop stops rather than train on placeholder embeddings; `check_data` catches it up front.

The thought loop exists once, in fill_thoughts (recompute passes) and decode_thoughts (the cache scheme, also
generate's). Both take `intervene(i, vec_BD)`, which sees thought i's vector before it is written and returns
what is written; the recompute passes run through archs.hooks.loop("thoughts", ...), so interp.capture names
each pass's activations. interp calls these, with recompute=True where it reads every pass whole.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from altbench.archs import backbone, hooks, lm
from altbench.archs.sampling import sample_logits


@dataclasses.dataclass(frozen=True)
class Config(backbone.Config):
  thoughts: int = 0     # k: sequential thought passes in training (>= the data's most thoughts per row) and the
                        # thoughts generate() takes after a prompt ending in <bot>; 0: a plain AR LM
  prefix_len: int = 0   # 0: recompute the sequence per thought (any layout); P: <bot> at index P - 1 in every row,
                        # thoughts decode from the prefix's cache (reasoning_tasks.layout(data).prefix_len)
  mask_id: int = -1     # <mask>, the placeholder at thought positions (filled from the tokenizer)
  bot_id: int = -1
  eot_id: int = -1
  thought_loss: float = 0.0  # weight of the thoughts' readout loss: each thought, through the output head, should
                             # put its mass on the tokens of the step it replaces (the batch's thought_targets;
                             # for the BFS-frontier CoT, frontier supervision as in Coconut-BFS); 0: Coconut's
                             # loss only

  def validate(self):
    super().validate()
    if not self.causal:
      raise ValueError("causal=False: continuous thoughts feed hidden states forward; the backbone must be causal")
    if self.thoughts < 0 or self.prefix_len < 0:
      raise ValueError(f"thoughts={self.thoughts}, prefix_len={self.prefix_len}: must be >= 0")
    if self.thought_loss < 0:
      raise ValueError(f"thought_loss={self.thought_loss}: must be >= 0")


def build(cfg, rngs):
  if cfg.vocab_size <= 0:
    raise ValueError(f"vocab_size={cfg.vocab_size}: must be set (the loop fills it from the tokenizer)")
  for name in ("mask_id", "bot_id", "eot_id") if cfg.thoughts else ():
    if getattr(cfg, name) < 0:
      raise ValueError(f"{name}={getattr(cfg, name)}: must be set (the loop fills it from the tokenizer)")
  cfg.validate()
  return lm.LM(cfg, rngs)


def check_data(cfg, lay):
  """Raises ValueError when the data's thoughts or layout do not fit this config. lay: the reasoning task's
  resolved layout (its mode, thoughts, max_stage, prefix_len), or None for other data; train/config.py passes it."""
  if lay is None or lay.mode != "coconut":
    return
  if cfg.thoughts < lay.max_stage * lay.thoughts:
    raise ValueError(f"thoughts={cfg.thoughts}: the data has up to task_max_stage * task_thoughts = "
                     f"{lay.max_stage * lay.thoughts} thoughts per row")
  if cfg.prefix_len not in (0, lay.prefix_len):
    raise ValueError(f"prefix_len={cfg.prefix_len}: the data puts <bot> at index {lay.prefix_len - 1}; use "
                     f"{lay.prefix_len} (or 0 to recompute per thought)")


def _positions(b, l):
  return jnp.broadcast_to(jnp.arange(l), (b, l))


def fill_thoughts(model, x_BLD, latent_BL, segment_ids_BL=None, *, recompute=False, intervene=None):
  """x with the embedding at every thought position replaced by the hidden state one position before it.

  recompute: full passes, one per thought, whatever prefix_len (interp.capture reads every pass whole; the
    values equal the cache scheme's up to float rounding).
  intervene(i, vec_BD) -> vec_BD: called with thought i's vector of every row (i may be traced; a row without a
    thought i ignores it), returns the vector written instead; the later thoughts are computed from it.
  """
  cfg = model.cfg
  if cfg.thoughts == 0:
    return x_BLD
  b, l, d = x_BLD.shape
  pos = _positions(b, l)
  if recompute or cfg.prefix_len == 0:
    order_BL = jnp.cumsum(latent_BL, axis=1) - 1  # which thought of its row a position is

    def one_pass(x, i):
      h, _ = model.backbone(x, pos, segment_ids_BL)
      before = jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
      here = (latent_BL & (order_BL == i))[..., None]
      if intervene is not None:  # one vector per row (zeros without a thought i), broadcast back
        before = intervene(i, jnp.sum(jnp.where(here, before, 0), axis=1))[:, None]
      return jnp.where(here, before.astype(x.dtype), x)

    return hooks.loop("thoughts", one_pass, x_BLD, cfg.thoughts)
  p = cfg.prefix_len
  cache = backbone.init_cache(cfg, b, l)
  h, cache = model.backbone(x_BLD[:, :p], pos[:, :p], None, cache, 0)
  return decode_thoughts(model, x_BLD, latent_BL, h[:, -1:], cache, p, cfg.thoughts, intervene)[0]


def decode_thoughts(model, x_BLD, latent_BL, h_B1D, cache, start, n, intervene=None):
  """The cache scheme: n one-token decode steps at slots start, start + 1, ... after a prefill of x[:, :start]
  (cache, and h its last hidden state). A thought slot's input is the previous step's hidden state (thought i:
  slot start + i, passed through intervene as in fill_thoughts), another slot's its own embedding.
  Returns (x with the thoughts written, cache)."""
  b = x_BLD.shape[0]

  def step(i, carry):
    x, h_prev, cache = carry
    slot = start + i
    token = jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=1)
    is_thought = jax.lax.dynamic_slice_in_dim(latent_BL, slot, 1, axis=1)[..., None]
    if intervene is not None:
      h_prev = intervene(i, h_prev[:, 0])[:, None]
    e = jnp.where(is_thought, h_prev.astype(x.dtype), token)
    x = jax.lax.dynamic_update_slice_in_dim(x, e, slot, axis=1)
    h, cache = model.backbone(e, jnp.full((b, 1), slot), None, cache, slot)
    return x, h, cache

  x, _, cache = jax.lax.fori_loop(0, n, step, (x_BLD, h_B1D, cache))
  return x, cache


def layout_ok(cfg, latent_BL):
  """Whether every thought of the batch is computed by the chosen scheme (else the loss is NaN)."""
  if cfg.prefix_len == 0:
    return jnp.all(jnp.sum(latent_BL, axis=1) <= cfg.thoughts)
  idx = jnp.arange(latent_BL.shape[1])
  inside = (idx >= cfg.prefix_len) & (idx < cfg.prefix_len + cfg.thoughts)
  return ~jnp.any(latent_BL & ~inside[None])


def forward_embeddings(model, x_BLD, latent_BL, segment_ids_BL=None, *, recompute=False, intervene=None):
  """Logits (b, l, vocab) from input embeddings, thoughts filled in (recompute, intervene: fill_thoughts')."""
  b, l, _ = x_BLD.shape
  x_BLD = fill_thoughts(model, x_BLD, latent_BL, segment_ids_BL, recompute=recompute, intervene=intervene)
  h, _ = model.backbone(x_BLD, _positions(b, l), segment_ids_BL)
  return model.logits(h)


def forward(model, tokens_BL, segment_ids_BL=None, *, recompute=False, intervene=None):
  """Logits (b, l, vocab) of token ids whose <mask> positions are thoughts (recompute, intervene: fill_thoughts')."""
  latent_BL = tokens_BL == model.cfg.mask_id
  return forward_embeddings(model, model.embed_tokens(tokens_BL), latent_BL, segment_ids_BL, recompute=recompute,
                            intervene=intervene)


def answer_metrics(logits_BLV, targets_BL, mask_BL):
  """Token accuracy and whole-example exact match: a row counts when every loss-masked token is argmax-right
  (for answer-only layouts that is greedy-decoding accuracy; with CoT, greedy reproduces the gold steps too)."""
  hit_BL = jnp.argmax(logits_BLV, -1) == targets_BL
  scored_B = jnp.any(mask_BL > 0, axis=1)
  exact_B = jnp.all(hit_BL | (mask_BL == 0), axis=1) & scored_B
  return {"correct": jnp.sum(hit_BL * mask_BL), "exact": jnp.sum(exact_B.astype(jnp.float32)),
          "examples": jnp.sum(scored_B.astype(jnp.float32))}


def thought_readout_nll(logits_BLV, thought_targets_BLF):
  """(sum over scored positions of -mean_{v in targets} log p(v), scored positions): the readout loss at the
  positions whose hidden state becomes a thought; targets are token ids, -1 padded."""
  valid_BLF = thought_targets_BLF >= 0
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  logp_BLF = jnp.take_along_axis(logp_BLV, jnp.maximum(thought_targets_BLF, 0), axis=-1)
  n_BL = jnp.sum(valid_BLF, axis=-1)
  nll_BL = -jnp.sum(jnp.where(valid_BLF, logp_BLF, 0.0), axis=-1) / jnp.maximum(n_BL, 1)
  return jnp.sum(nll_BL), jnp.sum(n_BL > 0).astype(jnp.float32)


def loss(model, batch, rng):
  """Next-token cross-entropy over loss_mask (the remaining steps and the answer), thoughts filled in, plus
  thought_loss times the thoughts' mean readout loss when the config asks for it."""
  del rng
  tokens = batch["inputs"]
  logits_BLV = forward(model, tokens, batch["segment_ids"])
  mask_BL = batch["loss_mask"].astype(jnp.float32)
  nll_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch["targets"]) * mask_BL
  n_tokens = jnp.sum(mask_BL)
  metrics = {"nats": jnp.sum(nll_BL), "tokens": n_tokens, "bytes": jnp.sum(batch["nbytes"] * mask_BL),
             **answer_metrics(logits_BLV, batch["targets"], mask_BL)}
  value = jnp.sum(nll_BL) / jnp.maximum(n_tokens, 1.0)
  if model.cfg.thought_loss > 0:
    if "thought_targets" not in batch:
      raise ValueError("thought_loss > 0 needs batches with thought_targets (a reasoning task in coconut mode)")
    thought_nats, n_thoughts = thought_readout_nll(logits_BLV, batch["thought_targets"])
    metrics.update(thought_nats=thought_nats, thoughts=n_thoughts)
    value = value + model.cfg.thought_loss * thought_nats / jnp.maximum(n_thoughts, 1.0)
  ok = layout_ok(model.cfg, tokens == model.cfg.mask_id)
  return jnp.where(ok, value, jnp.nan), metrics


def flops_per_token(cfg, seq_len):
  """Training FLOPs per token (forward + backward = 3x forward) of all the passes.

  prefix_len 0: k + 1 full passes. prefix_len P: a prefill of P tokens, k decode tokens attending over the
  seq_len-slot cache (the score matrix is computed over every slot), and one full pass.
  """
  head = 2 * cfg.d_model * cfg.vocab_size
  full = backbone.forward_flops_per_token(cfg, seq_len)
  if cfg.prefix_len == 0:
    return 3 * ((cfg.thoughts + 1) * full + head)
  p = min(cfg.prefix_len, seq_len)
  prefix = p * backbone.forward_flops_per_token(cfg, p)
  return 3 * ((prefix + cfg.thoughts * full) / seq_len + full + head)


# ---------------------------------------------------------------- sampling


def generate(model, prompt_BT, max_new_tokens, rng, *, temperature=1.0, top_k=0, top_p=1.0):
  """Continue equal-length prompts. When every prompt ends with <bot> and thoughts > 0: k continuous thoughts
  (returned as <mask> placeholders), then <eot>, then max_new_tokens - k - 1 sampled tokens; otherwise plain
  AR sampling. Returns (b, T + max_new_tokens) ids."""
  cfg = model.cfg
  prompt = np.asarray(prompt_BT, np.int32)
  if cfg.thoughts == 0 or not np.all(prompt[:, -1] == cfg.bot_id):
    return lm.generate(model, prompt, max_new_tokens, rng, temperature=temperature, top_k=top_k, top_p=top_p)
  if max_new_tokens < cfg.thoughts + 2:
    raise ValueError(f"max_new_tokens={max_new_tokens}: needs room for {cfg.thoughts} thoughts, <eot> and a token")
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt), rng, max_new_tokens, float(temperature), int(top_k),
                   float(top_p))


@jax.jit(static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, state, prompt_BT, rng, max_new_tokens, temperature, top_k, top_p):
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
  b, t = prompt_BT.shape
  k = cfg.thoughts
  cache = backbone.init_cache(cfg, b, t + max_new_tokens)
  x = model.embed_tokens(prompt_BT)
  h, cache = model.backbone(x, _positions(b, t), None, cache, 0)
  x = jnp.concatenate([x, jnp.zeros((b, k, x.shape[-1]), x.dtype)], axis=1)  # slots t .. t + k - 1: thoughts
  latent = jnp.broadcast_to(jnp.arange(t + k) >= t, (b, t + k))
  _, cache = decode_thoughts(model, x, latent, h[:, -1:], cache, t, k)  # <eot> reads the last one from the cache
  eot = jnp.full((b,), cfg.eot_id, jnp.int32)
  logits, cache = model(eot[:, None], cache=cache, cache_index=t + k)
  draw = lambda logits, key: sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
  n = max_new_tokens - k - 1
  keys = jax.random.split(rng, n)
  first = draw(logits[:, 0], keys[0])

  def step(carry, key):
    token_B, cache, index = carry
    logits_B1V, cache = model(token_B[:, None], cache=cache, cache_index=index)
    nxt = draw(logits_B1V[:, 0], key)
    return (nxt, cache, index + 1), token_B

  (last, _, _), tokens_NB = jax.lax.scan(step, (first, cache, t + k + 1), keys[1:])
  thoughts = jnp.full((b, k), cfg.mask_id, jnp.int32)
  return jnp.concatenate([prompt_BT, thoughts, eot[:, None], tokens_NB.T, last[:, None]], axis=1)
