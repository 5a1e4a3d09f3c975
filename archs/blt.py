"""BLT, the Byte Latent Transformer (Pagnoni et al., 2024), with fixed, space or entropy patching.

Position t reads input byte x[t] and predicts targets[t] = x[t + 1], as in the `lm` family (same scored bytes,
comparable bits per byte). The parts, with M patch slots per sequence (fixed shapes under jit):

  patching       archs.patching: starts[t] ("byte t starts a patch") is decided from bytes < t, so at position
                 t the model knows whether the current patch ends at t. At most M = ceil(L / min_mean_patch)
                 patches per sequence (ceil(L / P) for fixed); unused slots are padding, masked below.
  local encoder  byte embedding + hash n-gram embeddings (rolling polynomial hashes of the last n bytes,
                 n in hash_min_n..hash_max_n, one bucket table per n, summed in), then causal byte blocks
                 (encoder_pattern).
  pooling        per patch, a query (a projection of the mean of its encoder states) cross-attends to the
                 encoder states of its own bytes only -> a d_model patch vector.
  global model   any backbone pattern, causal over [start, patch 0, patch 1, ...] (slot 0 is learned).
  local decoder  starts from the encoder states; per decoder block, cross-attention from each byte to the
                 global outputs, then a causal byte block (decoder_pattern). Byte t sees slot 0 and the slots
                 of the patches that have ended by t (last byte <= t, i.e. strictly before the predicted
                 byte t + 1), never the patch still open at t, so nothing after t leaks in.

Decoding (generate, decode_logits) patches on the fly, identically to the batch patching: after byte t it
asks the patcher whether byte t + 1 starts a patch; if so the patch that ended at t is pooled and run through
the global model (one cached step) before byte t's logits are computed. Rows patch differently, so the
decode driver runs each row alone (vmap).

Entropy patching needs a small byte LM: `patcher_run` names a trained byte `lm` run directory whose newest
checkpoint the training loop loads and passes to build as `entropy_model` (`frozen_runs`); it is frozen, and
its weights then live, untrained, in the checkpoints of this run; a threshold must be set (experiments/bytes.py calibrates one with
archs.patching.calibrate_threshold for a target mean patch length). With patcher="entropy" and no
patcher_run, build warns and falls back to space patching. Tests pass any lm model as `entropy_model`.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from altbench import kernels
from altbench.archs import backbone, patching
from altbench.archs.layers import RMSNorm, normal
from altbench.archs.megabyte import ByteConfig, decode_logits, embed, generate, linear, scored_loss  # noqa: F401

HASH_BASE = 263  # a prime above every byte-model token id + 1, so short n-grams hash injectively before the modulus


@dataclasses.dataclass(frozen=True)
class Config(ByteConfig):
  pattern: str = "AAAA"          # global model over patches
  encoder_pattern: str = "A"     # local encoder blocks over bytes
  decoder_pattern: str = "AA"    # local decoder blocks, each after a cross-attention to the patches
  patcher: str = "entropy"       # fixed | space | entropy (see archs.patching)
  patch_size: int = 4            # fixed patching
  space_merge_runs: bool = True  # space patching: SpaceByte's rule (see archs.patching)
  max_patch_len: int = 16        # space / entropy: longest patch (0: no limit)
  min_mean_patch: int = 2        # slots per sequence M = ceil(L / min_mean_patch) (space / entropy)
  entropy_threshold: float = 0.0  # entropy: global rule threshold in nats (0: off)
  entropy_relative: float = 0.0  # entropy: monotonic rule threshold in nats (0: off)
  patcher_run: str = ""          # entropy: a trained byte `lm` run directory (the entropy model)
  hash_buckets: int = 4096       # buckets per n-gram table; 0: no hash n-gram embeddings
  hash_min_n: int = 3
  hash_max_n: int = 8

  def patcher_spec(self, fallback=False):
    kind = "space" if fallback else self.patcher
    return patching.Patcher(kind, size=self.patch_size, merge_runs=self.space_merge_runs,
                            threshold=self.entropy_threshold, relative=self.entropy_relative,
                            max_len=self.max_patch_len)

  def validate(self):
    super().validate()
    if self.patcher not in patching.KINDS:
      raise ValueError(f"patcher={self.patcher!r}: valid: {patching.KINDS}")
    if self.patcher == "entropy" and self.patcher_run and self.entropy_threshold <= 0 and self.entropy_relative <= 0:
      raise ValueError("entropy_threshold=0 and entropy_relative=0: entropy patching needs a threshold "
                       "(archs.patching.calibrate_threshold picks one for a target mean patch length)")
    if self.min_mean_patch < 1 or self.patch_size < 1 or self.max_patch_len < 0:
      raise ValueError(f"min_mean_patch={self.min_mean_patch}, patch_size={self.patch_size}, max_patch_len="
                       f"{self.max_patch_len}: need positive sizes (max_patch_len 0 = no limit)")
    if self.hash_buckets < 0 or (self.hash_buckets and not 1 <= self.hash_min_n <= self.hash_max_n):
      raise ValueError(f"hash_buckets={self.hash_buckets}, n={self.hash_min_n}..{self.hash_max_n}: need buckets >= 0 "
                       "and 1 <= hash_min_n <= hash_max_n")
    for name in ("encoder_pattern", "decoder_pattern"):
      try:
        self.sub(getattr(self, name), local=True).validate()
      except ValueError as e:
        raise ValueError(f"({name}) {e}") from None

  @property
  def hash_ns(self):
    return tuple(range(self.hash_min_n, self.hash_max_n + 1)) if self.hash_buckets else ()


def ngram_hash(x_BL, n, buckets):
  """Bucket ids (b, L) of the n-gram ending at each byte: sum_i (x[t - i] + 1) * HASH_BASE^i mod 2^32, mod buckets.

  Bytes before the sequence start count as 0, so decoding (which hashes the last n bytes it has read)
  gives the same ids as the whole sequence.
  """
  v = (x_BL.astype(jnp.int32) + 1).astype(jnp.uint32)
  h = jnp.zeros(x_BL.shape, jnp.uint32)
  for i in range(n - 1, -1, -1):  # Horner over x[t - n + 1], ..., x[t]
    shifted = jnp.pad(v, ((0, 0), (i, 0)))[:, : x_BL.shape[1]]
    h = h * jnp.uint32(HASH_BASE) + shifted
  return (h % jnp.uint32(buckets)).astype(jnp.int32)


class CrossAttention(nnx.Module):
  """Pre-norm multi-head attention from queries (b, T, d_q) to keys/values (b, S, d_kv) under a (b, T, S) mask."""

  def __init__(self, cfg, d_q, d_kv, heads, rngs, *, out_std):
    self.norm_q = RMSNorm(d_q, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.norm_kv = RMSNorm(d_kv, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.q, self.k, self.v = linear(cfg, d_q, d_q, rngs), linear(cfg, d_kv, d_q, rngs), linear(cfg, d_kv, d_q, rngs)
    self.o = linear(cfg, d_q, d_q, rngs, out_std)
    self.heads, self.impl = heads, cfg.attn_impl

  def __call__(self, x_BTD, kv_BSE, mask_BTS):
    split = lambda t: rearrange(t, "b l (h d) -> b l h d", h=self.heads)
    kv = self.norm_kv(kv_BSE)
    q, k, v = split(self.q(self.norm_q(x_BTD))), split(self.k(kv)), split(self.v(kv))
    out = kernels.attention(q, k, v, causal=False, mask=mask_BTS, impl=self.impl)
    return self.o(rearrange(out, "b l h d -> b l (h d)"))


class BLT(nnx.Module):

  def __init__(self, cfg, rngs, entropy_model=None):
    self.cfg = cfg
    g = cfg.global_cfg
    enc, dec = cfg.sub(cfg.encoder_pattern, local=True), cfg.sub(cfg.decoder_pattern, local=True)
    self.enc_cfg, self.dec_cfg = enc, dec
    fallback = cfg.patcher == "entropy" and entropy_model is None and not cfg.patcher_run
    if fallback:
      warnings.warn("BLT patcher='entropy' without patcher_run (a trained byte `lm` run): using space patching")
    self.patcher = cfg.patcher_spec(fallback)
    if self.patcher.needs_entropy:
      if entropy_model is None:  # archs/ reads no checkpoints: the loop restores the run (frozen_runs below)
        raise ValueError(f"patcher_run={cfg.patcher_run!r}: build needs the run's model as entropy_model "
                         "(train.step.build_model loads it)")
      self.entropy = patching.EntropyModel(entropy_model)
      if self.entropy.lm.cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"the entropy model's vocab_size {self.entropy.lm.cfg.vocab_size} differs from "
                         f"vocab_size={cfg.vocab_size}")
    else:
      self.entropy = None
    dl, d = cfg.d_local, cfg.d_model
    self.embed = embed(enc, cfg.vocab_size, dl, rngs)
    self.hash_embed = embed(enc, len(cfg.hash_ns) * cfg.hash_buckets, dl, rngs) if cfg.hash_ns else None
    self.encoder = nnx.List([backbone.Block(kind, enc, rngs) for kind in cfg.encoder_pattern])
    self.encoder_norm = RMSNorm(dl, eps=cfg.norm_eps, dtype=enc.compute_dtype, param_dtype=enc.weight_dtype)
    self.pool_query = linear(g, dl, d, rngs)
    self.pool = CrossAttention(g, d, dl, cfg.n_heads, rngs, out_std=cfg.init_std)
    self.start = nnx.Param(normal(cfg.init_std)(rngs.params(), (d,), g.weight_dtype))
    self.global_model = backbone.Backbone(g, rngs)
    out_std = cfg.init_std / (2 * len(cfg.decoder_pattern)) ** 0.5
    self.cross = nnx.List([CrossAttention(dec, dl, d, cfg.local_heads, rngs, out_std=out_std)
                           for _ in cfg.decoder_pattern])
    self.decoder = nnx.List([backbone.Block(kind, dec, rngs) for kind in cfg.decoder_pattern])
    self.decoder_norm = RMSNorm(dl, eps=cfg.norm_eps, dtype=dec.compute_dtype, param_dtype=dec.weight_dtype)
    self.head = linear(dec, dl, cfg.vocab_size, rngs)

  def max_patches(self, length):
    return self.patcher.max_patches(length, self.cfg.min_mean_patch)

  def embed_bytes(self, x_BL):
    """Byte embedding plus the hash n-gram embeddings of the n-grams ending at each byte."""
    e = self.embed(x_BL)
    for i, n in enumerate(self.cfg.hash_ns):
      e = e + self.hash_embed(ngram_hash(x_BL, n, self.cfg.hash_buckets) + i * self.cfg.hash_buckets)
    return e

  def pool_patches(self, enc_BLD, ids_BL, n_slots):
    """Patch vectors (b, n_slots, d_model): patch p's query attends to the encoder states of its bytes."""
    member_BPL = ids_BL[:, None, :] == jnp.arange(n_slots)[None, :, None]
    count_BP = jnp.sum(member_BPL, axis=-1, keepdims=True)
    mean = jnp.einsum("bpl,bld->bpd", member_BPL.astype(enc_BLD.dtype), enc_BLD) / jnp.maximum(count_BP, 1)
    q = self.pool_query(mean)
    patches = q + self.pool(q, enc_BLD, member_BPL)
    return jnp.where(count_BP > 0, patches, 0).astype(q.dtype)  # empty (padding) slots carry nothing

  def patch(self, x_BL):
    """starts (b, L + 1) and capped (b, L + 1) for a whole sequence (see archs.patching)."""
    h = self.entropy.entropies(x_BL) if self.entropy is not None else None
    return self.patcher.batch(x_BL, h, max_patches=self.max_patches(x_BL.shape[1]))

  def __call__(self, x_BL, starts_BL1=None):
    """Logits (b, L, vocab) in float32 and the patch starts (b, L + 1) used."""
    b, l = x_BL.shape
    n_slots = self.max_patches(l)
    if starts_BL1 is None:
      starts_BL1, _ = self.patch(x_BL)
    ids_BL, closed_BL = patching.patch_layout(starts_BL1)
    positions = jnp.broadcast_to(jnp.arange(l), (b, l))
    h = self.embed_bytes(x_BL)
    for block in self.encoder:
      h, _ = block(h, positions)
    enc = self.encoder_norm(h)
    patches = self.pool_patches(enc, ids_BL, n_slots)
    start = jnp.broadcast_to(self.start[...].astype(patches.dtype), (b, 1, self.cfg.d_model))
    g, _ = self.global_model(jnp.concatenate([start, patches], 1),
                             jnp.broadcast_to(jnp.arange(n_slots + 1), (b, n_slots + 1)))
    # Slot s >= 1 holds patch s - 1; byte t may read it once that patch has ended (s - 1 < closed[t]).
    visible_BLS = jnp.arange(n_slots + 1)[None, None, :] <= closed_BL[:, :, None]
    h = enc
    for cross, block in zip(self.cross, self.decoder):
      h = h + cross(h, g, visible_BLS)
      h, _ = block(h, positions)
    return self.head(self.decoder_norm(h)).astype(jnp.float32), starts_BL1

  # ---------------------------------------------------------------- decoding (one sequence, batch 1)

  def decode_init(self, total_len):
    cfg, n_slots = self.cfg, self.max_patches(total_len)
    first = self.start[...].astype(self.cfg.global_cfg.compute_dtype)[None, None]
    g0, gcache = self.global_model(first, jnp.zeros((1, 1), jnp.int32),
                                   cache=backbone.init_cache(cfg.global_cfg, 1, n_slots + 1), cache_index=0)
    state = {
        "patcher": self.patcher.init(1),
        "ids": jnp.full((1, total_len), -1, jnp.int32),                     # patch id of each byte read
        "enc": jnp.zeros((1, total_len, cfg.d_local), self.enc_cfg.compute_dtype),  # encoder states
        "recent": jnp.full((1, max(cfg.hash_ns, default=1)), -1, jnp.int32),  # the last bytes, for hashing
        "encoder": backbone.init_cache(self.enc_cfg, 1, total_len),
        "global": gcache,
        "slots": jnp.zeros((1, n_slots + 1, cfg.d_model), g0.dtype).at[:, :1].set(g0),
        "decoder": backbone.init_cache(self.dec_cfg, 1, total_len),
    }
    if self.entropy is not None:
      state["entropy"] = self.entropy.init_cache(1, total_len)
    return state

  def decode_step(self, state, x_1, j):
    """Read byte j (x_1: (1,)); returns (state, logits (1, vocab)) for byte j + 1."""
    cfg, n_slots = self.cfg, state["slots"].shape[1] - 1
    pos = jnp.full((1, 1), j)
    count = state["patcher"]["count"]
    ids = jax.lax.dynamic_update_slice_in_dim(state["ids"], (count - 1)[:, None], j, 1)  # byte j's patch
    recent = jnp.concatenate([state["recent"][:, 1:], x_1[:, None]], 1)
    h = self.embed(x_1[:, None])
    for i, n in enumerate(cfg.hash_ns):  # bytes before the sequence are -1 in `recent`: hash value 0, as in batch
      h = h + self.hash_embed(ngram_hash(recent, n, cfg.hash_buckets)[:, -1:] + i * cfg.hash_buckets)
    caches = []
    for block, cache in zip(self.encoder, state["encoder"]):
      h, cache = block(h, pos, cache=cache, cache_index=j)
      caches.append(cache)
    enc_1 = self.encoder_norm(h)
    enc = jax.lax.dynamic_update_slice_in_dim(state["enc"], enc_1.astype(state["enc"].dtype), j, 1)
    new = {**state, "ids": ids, "recent": recent, "encoder": caches, "enc": enc}
    # Does byte j + 1 start a patch? Then the patch holding byte j has ended: pool it, one global step.
    ent = None
    if self.entropy is not None:
      ent, new["entropy"] = self.entropy.step(x_1, state["entropy"], j)
    new["patcher"], ends, _ = self.patcher.step(state["patcher"], x_1, ent, n_slots)
    patch_id = count[0] - 1

    def close(slots_gcache):
      slots, gcache = slots_gcache
      member = (ids == patch_id)  # bytes not read yet have id -1
      count_p = jnp.sum(member, axis=-1, keepdims=True)[..., None]
      mean = jnp.einsum("bl,bld->bd", member.astype(enc.dtype), enc)[:, None] / jnp.maximum(count_p, 1)
      q = self.pool_query(mean)
      patch = (q + self.pool(q, enc, member[:, None, :])).astype(slots.dtype)
      out, gcache = self.global_model(patch, jnp.full((1, 1), patch_id + 1), cache=gcache, cache_index=patch_id + 1)
      return jax.lax.dynamic_update_slice_in_dim(slots, out.astype(slots.dtype), patch_id + 1, 1), gcache

    new["slots"], new["global"] = jax.lax.cond(ends[0], close, lambda sg: sg, (state["slots"], state["global"]))
    closed = count + ends.astype(jnp.int32) - 1  # patches ended by byte j
    visible = (jnp.arange(n_slots + 1)[None] <= closed[:, None])[:, None, :]
    h = enc_1
    caches = []
    for cross, block, cache in zip(self.cross, self.decoder, state["decoder"]):
      h = h + cross(h, new["slots"], visible)
      h, cache = block(h, pos, cache=cache, cache_index=j)
      caches.append(cache)
    new["decoder"] = caches
    return new, self.head(self.decoder_norm(h))[:, 0].astype(jnp.float32)


def frozen_runs(cfg):
  """{build keyword: run directory}: trained models this config embeds, frozen (the loop loads them)."""
  return {"entropy_model": cfg.patcher_run} if cfg.patcher == "entropy" and cfg.patcher_run else {}


def build(cfg, rngs, entropy_model=None):
  """The BLT model; entropy_model (an `lm` model, frozen here) is the model of cfg.patcher_run (or any byte lm)."""
  if cfg.vocab_size <= 0:
    raise ValueError(f"vocab_size={cfg.vocab_size}: must be set (the loop fills it from the tokenizer)")
  cfg.validate()
  return BLT(cfg, rngs, entropy_model)


def loss(model, batch, rng):
  """Mean next-byte cross-entropy over loss_mask; metrics add the patch count (mean patch length =
  tokens / patches) and the boundaries lost to the max_patches cap."""
  del rng
  starts, capped = model.patch(batch["inputs"])
  logits, _ = model(batch["inputs"], starts)
  mask = batch["loss_mask"].astype(jnp.float32)
  return scored_loss(logits, batch, starts[:, :-1].astype(jnp.float32),
                     {"patch_capped": jnp.sum(capped[:, :-1] * mask)})


def flops_per_token(cfg, seq_len):
  """Training FLOPs per byte: 3x the forward of the trained parts plus 1x the frozen entropy model's forward.

  With L = seq_len, M = max patches (slots), d = d_model, e = d_local, V = vocab, per byte:
    encoder and decoder blocks   backbone FLOPs at length L (their patterns, width e)
    pooling                      mean 2 M e, keys/values 4 e d, scores and values 4 M d,
                                 + per patch (M / L): query 2 e d, q 2 d^2, out 2 d^2
    global model                 (M + 1) / L x backbone FLOPs per slot at length M + 1
    decoder cross-attention      per block: q and out 4 e^2, scores and values 4 (M + 1) e,
                                 + per slot ((M + 1) / L): keys/values 4 d e
    head                         2 e V
  The patching scan and hash lookups are not matmuls and are left out, as are norms and softmaxes.
  """
  cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 262)
  fallback = cfg.patcher == "entropy" and not cfg.patcher_run
  m = cfg.patcher_spec(fallback).max_patches(seq_len, cfg.min_mean_patch)
  s = m + 1
  d, e, v, lf = cfg.d_model, cfg.d_local, cfg.vocab_size, seq_len
  enc = backbone.forward_flops_per_token(cfg.sub(cfg.encoder_pattern, local=True), seq_len)
  dec = backbone.forward_flops_per_token(cfg.sub(cfg.decoder_pattern, local=True), seq_len)
  pool = 2 * m * e + 4 * e * d + 4 * m * d + (m / lf) * (2 * e * d + 4 * d * d)
  glob = (s / lf) * backbone.forward_flops_per_token(cfg.global_cfg, s)
  cross = len(cfg.decoder_pattern) * (4 * e * e + 4 * s * e + (s / lf) * 4 * d * e)
  fwd = enc + dec + pool + glob + cross + 2 * e * v
  frozen = 0.0
  if cfg.patcher == "entropy" and cfg.patcher_run:
    frozen = patching.lm_forward_flops(patching.run_lm_config(cfg.patcher_run), seq_len)
  return 3 * fwd + frozen
