"""MegaByte (Yu et al., 2023): a global model over fixed patches of P bytes and a local model inside each patch.

Position t reads input byte x[t] and predicts targets[t] = x[t + 1], like the `lm` family, so the loss is
scored on the same target bytes and its bits per byte compare. With K = ceil(L / P) patches of the inputs:

  patch embedder  the P byte embeddings of patch k, concatenated (P * d_local) -> Linear -> d_model
  global model    any backbone pattern, causal over patches; its input at slot k is the embedding of patch
                  k - 1 (slot 0: a learned start vector), so its output for patch k depends on patches < k
                  only: the one-patch shift that keeps the model causal
  global -> local Linear(d_model -> P * d_local): one conditioning vector per position inside the patch
  local model     any backbone pattern, causal inside each patch (length P): position i of patch k reads the
                  global output for patch k plus input bytes kP..kP+i (= the target bytes before target i of
                  the patch, and the last byte of the previous patch) and predicts target byte kP+i
  head            d_local -> vocabulary

Nothing reaches position t from an input byte after t. Documents packed in one window are not separated
(MegaByte and BLT do not mask them): a patch may straddle an <eos>. Decoding keeps a KV/SSM cache for the
global model (one step per patch) and one for the local model (reset at each patch), and gives the same
logits as the full forward (tests/test_bytes.py). The shared decode driver below serves BLT too.
"""

import dataclasses

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from altbench.archs import backbone, lm
from altbench.archs.layers import normal
from altbench.archs.sampling import sample_logits

MAX_BYTE_VOCAB = 512  # byte families need the byte tokenizer (256 bytes + specials)


@dataclasses.dataclass(frozen=True)
class ByteConfig:
  """Fields every patch-based byte model shares: a global model over patches and local models over bytes."""
  vocab_size: int = 0          # 0: the tokenizer's (256 bytes + specials)
  pattern: str = "AAAA"        # the global model over patches (backbone pattern)
  d_model: int = 256           # global width
  n_heads: int = 4
  n_kv_heads: int = 0
  d_ff: int = 0                # 0: 8/3 d_model rounded to 64
  d_local: int = 128           # width of the byte-level (local) models
  local_heads: int = 4
  local_d_ff: int = 0
  mlp: bool = True
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = "float32"
  param_dtype: str = "float32"
  attn_impl: str = "auto"
  ssm_impl: str = "auto"
  d_state: int = 64            # Mamba-2 fields, for "M"/"P" blocks in any part
  ssm_headdim: int = 64
  ssm_ngroups: int = 1
  ssm_expand: int = 2
  d_conv: int = 4
  chunk_size: int = 64
  gdn_heads: int = 0           # Gated DeltaNet fields, for "G" blocks in any part
  gdn_head_dim: int = 0
  gdn_expand_v: int = 2
  gdn_impl: str = "auto"

  def sub(self, pattern, *, local):
    """The backbone.Config of one part: the global model (local=False) or a byte-level stack."""
    width = dict(d_model=self.d_local, n_heads=self.local_heads, d_ff=self.local_d_ff) if local else dict(
        d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_ff=self.d_ff)
    shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(backbone.Config)
              if f.name in {g.name for g in dataclasses.fields(ByteConfig)} and f.name not in
              ("pattern", "d_model", "n_heads", "n_kv_heads", "d_ff")}
    return backbone.Config(pattern=pattern, **width, **shared)

  @property
  def global_cfg(self):
    return self.sub(self.pattern, local=False)

  def validate(self):
    if self.vocab_size > MAX_BYTE_VOCAB:
      raise ValueError(f"vocab_size={self.vocab_size}: byte models need data.tokenizer=bytes "
                       f"(at most {MAX_BYTE_VOCAB} ids)")
    for name in ("d_local", "local_heads"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name}={getattr(self, name)}: must be positive")
    try:
      self.global_cfg.validate()
    except ValueError as e:
      raise ValueError(f"(global model) {e}") from None


@dataclasses.dataclass(frozen=True)
class Config(ByteConfig):
  patch_size: int = 4          # P: bytes per patch
  local_pattern: str = "AA"    # the local model inside a patch

  @property
  def local_cfg(self):
    return self.sub(self.local_pattern, local=True)

  def validate(self):
    super().validate()
    if self.patch_size < 1:
      raise ValueError(f"patch_size={self.patch_size}: must be positive")
    try:
      self.local_cfg.validate()
    except ValueError as e:
      raise ValueError(f"(local model, local_* fields) {e}") from None


def linear(cfg, d_in, d_out, rngs, std=None):
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                    kernel_init=normal(cfg.init_std if std is None else std), rngs=rngs)


def embed(cfg, n, d, rngs):
  return nnx.Embed(n, d, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, embedding_init=normal(cfg.init_std),
                   rngs=rngs)


class MegaByte(nnx.Module):

  def __init__(self, cfg, rngs):
    self.cfg = cfg
    g, loc = cfg.global_cfg, cfg.local_cfg
    p, dl = cfg.patch_size, cfg.d_local
    self.patch_embed = embed(g, cfg.vocab_size, dl, rngs)
    self.patch_proj = linear(g, p * dl, cfg.d_model, rngs)
    self.start = nnx.Param(normal(cfg.init_std)(rngs.params(), (cfg.d_model,), g.weight_dtype))
    self.global_model = backbone.Backbone(g, rngs)
    self.to_local = linear(g, cfg.d_model, p * dl, rngs)
    self.local_embed = embed(loc, cfg.vocab_size, dl, rngs)
    self.local_model = backbone.Backbone(loc, rngs)
    self.head = linear(loc, dl, cfg.vocab_size, rngs)

  def embed_patches(self, x_BKP):
    """(b, K, P) byte ids -> (b, K, d_model) patch embeddings."""
    e = rearrange(self.patch_embed(x_BKP), "b k p d -> b k (p d)")
    return self.patch_proj(e)

  def __call__(self, x_BL):
    """Logits (b, L, vocab) in float32; position t sees input bytes <= t only."""
    cfg, p = self.cfg, self.cfg.patch_size
    b, l = x_BL.shape
    k = -(-l // p)
    x_BKP = jnp.pad(x_BL, ((0, 0), (0, k * p - l))).reshape(b, k, p)  # padding sits after every real byte
    start = jnp.broadcast_to(self.start[...].astype(cfg.global_cfg.compute_dtype), (b, 1, cfg.d_model))
    global_in = jnp.concatenate([start, self.embed_patches(x_BKP)[:, :-1]], axis=1)  # the one-patch shift
    g_BKD, _ = self.global_model(global_in, jnp.broadcast_to(jnp.arange(k), (b, k)))
    cond = rearrange(self.to_local(g_BKD), "b k (p d) -> (b k) p d", p=p)
    h = self.local_embed(rearrange(x_BKP, "b k p -> (b k) p")) + cond
    h, _ = self.local_model(h, jnp.broadcast_to(jnp.arange(p), (b * k, p)))
    logits = rearrange(self.head(h), "(b k) p v -> b (k p) v", b=b)[:, :l]
    return logits.astype(jnp.float32)

  # ---------------------------------------------------------------- decoding (one sequence, batch 1)

  def decode_init(self, total_len):
    cfg = self.cfg
    p = cfg.patch_size
    return {"global": backbone.init_cache(cfg.global_cfg, 1, -(-total_len // p)),
            "local": backbone.init_cache(cfg.local_cfg, 1, p), "patch": jnp.zeros((1, p), jnp.int32),
            "cond": jnp.zeros((1, p, cfg.d_local), cfg.local_cfg.compute_dtype)}

  def decode_step(self, state, x_1, j):
    """Read byte j (x_1: (1,)); returns (state, logits (1, vocab)) for the byte after it."""
    cfg, p = self.cfg, self.cfg.patch_size
    i, k = j % p, j // p

    def new_patch(state):  # one global step: the previous patch (or the start vector) in slot k
      prev = self.embed_patches(state["patch"][:, None])
      inp = jnp.where(k == 0, self.start[...].astype(prev.dtype)[None, None], prev)
      g, cache = self.global_model(inp, jnp.full((1, 1), k), cache=state["global"], cache_index=k)
      cond = rearrange(self.to_local(g), "b 1 (p d) -> b p d", p=p).astype(state["cond"].dtype)
      return {"global": cache, "local": backbone.init_cache(cfg.local_cfg, 1, p),
              "patch": jnp.zeros_like(state["patch"]), "cond": cond}

    state = jax.lax.cond(i == 0, new_patch, lambda s: s, state)
    h = self.local_embed(x_1[:, None]) + jax.lax.dynamic_slice_in_dim(state["cond"], i, 1, axis=1)
    h, local = self.local_model(h, jnp.full((1, 1), i), cache=state["local"], cache_index=i)
    state = {**state, "local": local, "patch": state["patch"].at[:, i].set(x_1)}
    return state, self.head(h)[:, 0].astype(jnp.float32)


def build(cfg, rngs):
  if cfg.vocab_size <= 0:
    raise ValueError(f"vocab_size={cfg.vocab_size}: must be set (the loop fills it from the tokenizer)")
  cfg.validate()
  return MegaByte(cfg, rngs)


def scored_loss(logits_BLV, batch, patch_starts_BL=None, extra=None):
  """The AR family's loss and metrics on the same targets; patches (and extra) add summed metrics."""
  mask_BL = batch["loss_mask"].astype(jnp.float32)
  nll_BL = lm.token_nll(logits_BLV, batch["targets"], mask_BL)
  n_tokens = jnp.sum(mask_BL)
  metrics = {"nats": jnp.sum(nll_BL), "tokens": n_tokens, "bytes": jnp.sum(batch["nbytes"] * mask_BL),
             "correct": jnp.sum((jnp.argmax(logits_BLV, -1) == batch["targets"]) * mask_BL)}
  if patch_starts_BL is not None:
    metrics["patches"] = jnp.sum(patch_starts_BL * mask_BL)
  metrics.update(extra or {})
  return jnp.sum(nll_BL) / jnp.maximum(n_tokens, 1.0), metrics


def loss(model, batch, rng):
  """Mean next-byte cross-entropy over loss_mask; metrics give bits per byte and the patch count."""
  del rng
  logits = model(batch["inputs"])
  starts = (jnp.arange(batch["inputs"].shape[1]) % model.cfg.patch_size == 0).astype(jnp.float32)
  return scored_loss(logits, batch, starts[None])


def flops_per_token(cfg, seq_len):
  """Training FLOPs per byte (3x the forward): patch embedder and global->local projections (each
  2 d_local d_model per byte), the global model on ceil(L/P) patches (per patch / P), the local model on
  P-byte sequences, and the head."""
  cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or 262)
  p = cfg.patch_size
  k = -(-seq_len // p)
  per_patch = backbone.forward_flops_per_token(cfg.global_cfg, k)
  fwd = (k * p / seq_len) * (per_patch / p + 2 * 2 * cfg.d_local * cfg.d_model
                             + backbone.forward_flops_per_token(cfg.local_cfg, p) + 2 * cfg.d_local * cfg.vocab_size)
  return 3 * fwd


# ---------------------------------------------------------------- decoding driver (MegaByte and BLT)


def decode_logits(model, tokens_BT):
  """Logits (b, T, vocab) of the byte-by-byte decode path over given tokens (equals the full forward)."""
  graphdef, state = nnx.split(model)
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  return _decode(graphdef, state, tokens_BT, tokens_BT.shape[1], jax.random.key(0), 0.0, 0, 1.0)[1]


def generate(model, prompt_BT, max_new_tokens, rng, *, temperature=1.0, top_k=0, top_p=1.0):
  """Continue equal-length prompts byte by byte; returns (b, T + new) ids."""
  graphdef, state = nnx.split(model)
  prompt_BT = jnp.asarray(prompt_BT, jnp.int32)
  buf = jnp.pad(prompt_BT, ((0, 0), (0, int(max_new_tokens))))
  return _decode(graphdef, state, buf, prompt_BT.shape[1], rng, float(temperature), int(top_k), float(top_p))[0]


@jax.jit(static_argnums=(0, 5, 6, 7))
def _decode(graphdef, state, tokens_BT, prompt_len, rng, temperature, top_k, top_p):
  """Read tokens byte by byte; past prompt_len each byte is drawn from the logits before it. Returns the
  tokens and the logits after each byte. One compiled function serves decode_logits and generate."""
  model = nnx.merge(graphdef, state)
  b, total = tokens_BT.shape

  def row(buf, key):  # each row decodes alone (vmap): rows may patch differently
    keys = jax.random.split(key, total)

    def body(carry, j):
      st, buf = carry
      st, logits = model.decode_step(st, buf[j][None], j)
      nxt = sample_logits(logits, keys[j], temperature=temperature, top_k=top_k, top_p=top_p)[0]
      drawn = (j + 1 >= prompt_len) & (j + 1 < total)
      buf = jnp.where(drawn, buf.at[jnp.minimum(j + 1, total - 1)].set(nxt.astype(jnp.int32)), buf)
      return (st, buf), logits[0]

    (_, buf), logits = jax.lax.scan(body, (model.decode_init(total), buf), jnp.arange(total))
    return buf, logits

  return jax.vmap(row)(tokens_BT, jax.random.split(rng, b))
