"""Logit lens and tuned lens: read a residual-stream activation of any family as next-token logits.

logit_lens(model, h, name) applies the model's own readout, final norm then unembedding, to h (..., d):
  lm, diffusion, coconut, recurrent   backbone.final_norm + the head (or tied embedding), times
      logits_multiplier: any residual name (embed, blocks.{i}.resid_*, thoughts.*, core.blocks.*, core.state,
      steps.*), any leading axes. Diffusion logits are raw: diffusion.subs_log_probs gives the SUBS
      distribution (no <mask>, unmasked inputs copied). For recurrent depth, coda_lens(model, s) is the other
      natural read of a core state: the coda blocks too, i.e. the model's output had it stopped after that
      recurrence (logit_lens skips the coda).
  megabyte   only local.* names (the byte-level stack the head reads; layout (b * K, P, d_local)): global
      states become bytes only through to_local and the local model, so there is no lens for them.
  blt        decoder.* names, and encoder.final_norm (the decoder's residual stream starts from it): the
      decoder norm + head. encoder.blocks.* and global.* have other widths or meanings: ValueError.
For the value named final_norm itself (already normed) use `unembed`.

Tuned lens (Belrose et al., 2023): per name an affine translator h -> h + h W + b, W and b zero-initialised
so it starts as the logit lens, trained with optax (Adam) to minimise KL(final || lens) to the model's own
output distribution with the model frozen (fit_tuned_lens). One translator per name, shared over a stepped
name's steps (thoughts, recurrences, denoising steps).
"""

import jax
import jax.numpy as jnp
import optax
from einops import rearrange
from flax import nnx

from altbench.interp import capture


def _readout(model, name):
  """(norm, head) that turn the residual stream `name` of this model into logits."""
  family = capture.family_of(model)
  if family in ("lm", "diffusion", "coconut", "recurrent"):
    return model.backbone.final_norm, model.logits
  f32 = lambda head: (lambda h: head(h).astype(jnp.float32))
  if family == "megabyte" and name is not None and name.startswith("local."):
    return model.local_model.final_norm, f32(model.head)
  if family == "blt" and name is not None and (name.startswith("decoder.") or name == "encoder.final_norm"):
    return model.decoder_norm, f32(model.head)
  valid = {"megabyte": "local.*", "blt": "decoder.* or encoder.final_norm"}[family]
  raise ValueError(f"name={name!r}: a {family} model has a logit lens for {valid} only (the part its head reads)")


def logit_lens(model, h, name=None):
  """Logits (..., vocab) float32 of the final norm + unembedding applied to h (..., d); name is needed for
  byte families (which part h comes from)."""
  norm, head = _readout(model, name)
  return head(norm(h))


def unembed(model, h_normed, name=None):
  """Logits of an already normed state (e.g. the value named final_norm): the head alone."""
  return _readout(model, name)[1](h_normed)


def readout_terms(model, h_ND, token_ids_N, name=None, normed=False):
  """(n, d) per-dimension terms of the logit lens's logit for token_ids_N[i] read from h_ND[i]: final_norm(h)
  times the head's row for that token, so each row sums to the lens logit (less the head's bias). A probe on
  these terms reads every token with one d-wide map, through the model's own output space.
  normed: h is already the final norm's output (the value named final_norm)."""
  norm, head = _readout(model, name)
  d = h_ND.shape[-1]
  eye = jnp.eye(d, dtype=jnp.float32)
  w_DV = head(eye) - head(jnp.zeros((1, d), jnp.float32))  # the head's linear part, (d, vocab)
  hn = h_ND if normed else norm(h_ND)
  return hn.astype(jnp.float32) * w_DV[:, token_ids_N].T


def coda_lens(model, s_BLD, segment_ids_BL=None):
  """Recurrent depth: the logits the model gives when the core stops at state s (coda blocks, norm, head)."""
  b, l, _ = s_BLD.shape
  return model.coda(s_BLD, jnp.broadcast_to(jnp.arange(l), (b, l)), segment_ids_BL)


def init_tuned_lens(d_model, names):
  """Zero translators {name: {"w": (d, d), "b": (d,)}}, so the tuned lens starts equal to the logit lens.
  d_model: an int, or {name: width} where parts differ (byte families)."""
  width = d_model if isinstance(d_model, dict) else {n: d_model for n in names}
  return {n: {"w": jnp.zeros((width[n], width[n]), jnp.float32), "b": jnp.zeros((width[n],), jnp.float32)}
          for n in names}


def tuned_lens(model, params, name, h):
  """Logits of the tuned lens of `name` on h (..., d)."""
  p = params[name]
  h32 = h.astype(jnp.float32)
  return logit_lens(model, (h32 + h32 @ p["w"] + p["b"]).astype(h.dtype), name)


def to_output_layout(model, name, logits, out_shape):
  """Lens logits in the layout of the model's output (b, l, vocab): megabyte's local rows (b * K, P, V) are
  put back in byte order; other families already match (stepped names keep their leading axis)."""
  if capture.family_of(model) == "megabyte" and name.startswith("local."):
    b, l = out_shape[:2]
    return rearrange(logits, "(b k) p v -> b (k p) v", b=b)[:, :l]
  return logits


def kl_to_final(final_logits, lens_logits, mask=None):
  """Mean over positions (and any leading axes) of KL(softmax(final) || softmax(lens)), in nats."""
  logp = jax.nn.log_softmax(final_logits.astype(jnp.float32), -1)
  logq = jax.nn.log_softmax(lens_logits.astype(jnp.float32), -1)
  kl = jnp.sum(jnp.exp(logp) * (logp - logq), -1)
  if mask is None:
    return jnp.mean(kl)
  mask = jnp.broadcast_to(mask, kl.shape).astype(jnp.float32)
  return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def fit_tuned_lens(model, batches, names, steps=200, lr=1e-3, params=None, **forward_kw):
  """Train tuned-lens translators for `names` on the inputs `batches` (a list of (b, l) id arrays, cycled) to
  minimise the summed KL(model output || lens), the model frozen. Returns (params, losses (steps,)), the
  loss at each step before its update."""
  names = list(names)
  data = []
  for x in batches:
    out, cache = capture.run_with_cache(model, x, names=names, **forward_kw)
    data.append((out, {n: cache[n] for n in names}))
  if params is None:
    params = init_tuned_lens({n: data[0][1][n].shape[-1] for n in names}, names)
  graphdef, state = nnx.split(model)
  tx = optax.adam(lr)

  def loss_fn(params, state, out, acts):
    m = nnx.merge(graphdef, state)
    return sum(kl_to_final(out, to_output_layout(m, n, tuned_lens(m, params, n, acts[n]), out.shape))
               for n in names)

  @jax.jit
  def update(params, opt, state, out, acts):
    loss, grads = jax.value_and_grad(loss_fn)(params, state, out, acts)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  opt, losses = tx.init(params), []
  for i in range(steps):
    params, opt, loss = update(params, opt, state, *data[i % len(data)])
    losses.append(loss)
  return params, jnp.stack(losses)
