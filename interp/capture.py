"""Read and replace named activations of any family's forward pass: run_with_cache, run_with_patches, trace.

    out, cache = run_with_cache(model, inputs, names=None, **forward_kw)
    out = run_with_patches(model, inputs, patches, **forward_kw)
    out, cache = trace(model, inputs, names=None, patches=None, **forward_kw)   # no jit: for your own jit/vmap

`model` is a built family model (archs.<family>.build), `inputs` its token (or byte) ids (b, l) int32. The
family is found from the model (family_of); every family in archs.FAMILIES has a driver (DRIVERS). `out` is
what the family's forward computes: logits (b, l, vocab) float32 for every family (recurrent: the coda's
logits at r iterations, whose log_softmax is what model() returns; diffusion with steps > 0: the final
tokens instead, see below). `cache` is a flat dict {name: jax.Array}.

names: None keeps every activation; otherwise a list of exact names or fnmatch globs ("blocks.*.resid_post").
  Only what is asked is kept, and attention patterns and SSM states are computed only when asked (the fast
  kernels make neither). The filter is static (part of the jit key). A pattern that matches nothing raises
  ValueError listing the names the model has. `cache` holds a name's value as the model used it (after a
  patch, if one replaced it).
patches: {name: replacement}, names exact (no globs). A replacement is an array of the activation's shape
  (with the leading step axis for stepped names, see below), or a callable value -> new value of the same
  shape. Inside stepped passes a callable sees one step's value; `step()` gives the traced step index
  (0-based) to target steps. `at(source, positions, axis=1, steps=None)` builds the usual callable: copy
  `source` (a captured value of that name, with its step axis for stepped names) into the value at those
  positions (int or int array, may be traced; None: all) and, for stepped names, only at those steps, e.g.
  patches={"blocks.3.resid_post": at(clean_cache["blocks.3.resid_post"], 7)}. Unknown names and wrong
  shapes raise ValueError. run_with_patches jits per distinct callable (identity); for sweeps, jit or vmap
  `trace` yourself (interp/patching.py does). A patched value flows on: later activations are computed
  from it (the cache holds the patched value under its own name).

Every name below is "<part prefix><block or point>"; shapes for inputs (b, l).

Shared backbone (archs/backbone.py), per block i of the pattern (d = d_model of that part):
  embed                      (b, l, d)   input of block 0 (token embeddings, times embed_multiplier)
  blocks.{i}.resid_pre       (b, l, d)   residual stream into block i
  blocks.{i}.mixer_out       (b, l, d)   attention / Mamba-2 / parallel mixer output, before the residual add
  blocks.{i}.resid_mid       (b, l, d)   resid_pre + mixer_out (blocks with an MLP only)
  blocks.{i}.mlp_out         (b, l, d)   SwiGLU output (blocks with an MLP only)
  blocks.{i}.resid_post      (b, l, d)   residual stream out of block i (= resid_pre of block i + 1)
  blocks.{i}.attn.z          (b, l, h, hd) per-head attention outputs before the output projection ("A", "P")
  blocks.{i}.attn.pattern    (b, h, l, l) softmax probabilities, query x key, float32 ("A", "P"); patching it
                             recomputes the heads' outputs as pattern @ v
  blocks.{i}.ssm.state       (b, l, sh, p, n) float32 ("M", "P"): the Mamba-2 state right after reading
                             position t (h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, reset at a new segment), so
                             y_t = C_t h_t + D x_t. Patching it uses the new state at every (position, head)
                             where it differs from the computed one and runs the recurrence on from there, so
                             a patch at position t also changes every later position's state and output.
  blocks.{i}.ssm.state_rev   as ssm.state for the right-to-left scan of a bidirectional (diffusion) mixer,
                             indexed by original position: the state after reading positions l-1 .. t
  blocks.{i}.attn.out, blocks.{i}.ssm.out  (b, l, d) "P" blocks: the two scaled terms that sum to mixer_out
  final_norm                 (b, l, d)   final RMSNorm output: what the output head reads

Families (prefixes, extra points, leading step axes):
  lm         as above.
  diffusion  one denoiser pass on the (partly <mask>) inputs z: as above, segments from <eos> as in training.
             Block diffusion (block_size > 0) runs on [z, z] with the block-causal mask, as its sampler does,
             so the backbone names have length 2l (the first l positions are the noised copy; out is their
             logits). forward_kw steps=N > 0 instead runs a greedy confidence sampler (LLaDA-style, each step
             reveals the most confident masked positions, ceil(remaining / steps left) of them) from inputs
             as the canvas: names get the prefix "steps." and a leading axis N (e.g. steps.blocks.0.resid_post
             (N, b, l, d)), plus steps.canvas (N, b, l), each step's input tokens; out is the final tokens.
  coconut    thought passes are recomputed (as with prefix_len=0, also for prefix_len > 0 configs: same values
             up to float rounding): pass k = 0 .. thoughts-1 is a full backbone pass that fills thought k;
             its activations are "thoughts."-prefixed with a leading axis k (thoughts.blocks.1.resid_post
             (k, b, l, d)), plus thoughts.vector (k, b, d): thought k's vector (the normed last hidden state
             one position before it) as written into the input; patching it replaces thought k for all later
             passes. The unprefixed names are the final (scored) pass, whose `embed` holds every thought.
             (The family's own loop: coconut.forward with recompute=True.)
  recurrent  embed (prelude input); prelude.blocks.{i}.* (i < prelude); core.blocks.{i}.* with a leading
             recurrence axis r (i the block's index in the pattern); core.state (r, b, l, d), the state after
             each recurrence (s_1 .. s_r); coda.blocks.{i}.*; final_norm. forward_kw iters (default
             cfg.iters_at_test) and s0 (default the model's fixed random state); no adaptive exit (exit_kl
             is ignored: every position runs all iters). (The family's own test-time loop: recurrent.run_fixed.)
  megabyte   global.* is the global backbone over patch slots K = ceil(l / P): global.embed (b, K, d) is its
             input (start vector, then patch k - 1's embedding at slot k). local.* is the local backbone, in
             its own layout (b * K, P, d_local): row b * K + k is patch k of sequence b, local.embed is the
             byte embeddings plus the global conditioning.
  blt        patch_starts (b, l + 1) int (patchable: a replacement re-patches); encoder.blocks.{i}.* (b, l,
             d_local) (the byte and hash embeddings are encoder.blocks.0.resid_pre); encoder.final_norm;
             global.* over slots [start, patch 0, ...] (b, M + 1, d); decoder.blocks.{i}.* (resid_pre comes
             after that block's cross-attention add); decoder.final_norm (what the head reads).
"""

import fnmatch
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from altbench.archs import blt, coconut, diffusion, gated_deltanet, hooks, lm, megabyte, mamba2, recurrent
from altbench.archs.layers import Attention


class Tap:
  """Names the activations of one pass from module identity, records the wanted ones and applies patches."""

  def __init__(self, bases, names, patches, seen, prefix="", step=None):
    self.bases, self.names, self.patches, self.seen = bases, names, patches, seen
    self.prefix, self.step, self.values = prefix, step, {}

  def _full(self, module, name):
    base = self.bases.get(id(module))
    return None if base is None else self.prefix + base + name

  def _keeps(self, full):
    return self.names is None or any(fnmatch.fnmatchcase(full, p) for p in self.names)

  def wants(self, module, name):
    full = self._full(module, name)
    if full is None:
      return False
    self.seen.add(full)
    return self._keeps(full) or full in self.patches

  def replaces(self, module, name):
    full = self._full(module, name)
    return full is not None and full in self.patches

  def visit(self, module, name, value):
    full = self._full(module, name)
    return value if full is None else self.point(full[len(self.prefix):], value)

  def point(self, name, value):
    """value (or its patch) at the point `name` (without this pass's prefix); records it when wanted."""
    full = self.prefix + name
    self.seen.add(full)
    if full in self.values:
      raise RuntimeError(f"activation {full!r} was produced twice in one pass: a naming bug in interp.capture")
    if full in self.patches:
      value = _apply(full, self.patches[full], value, self.step)
    if self._keeps(full):
      self.values[full] = value
    return value

  def loop(self, name, fn, carry, n):
    """archs.hooks.loop under this tap: carry = fn(carry, i) for i < n (n static) in a scan, each step under a
    child tap prefixed "name."; the steps' recorded values come back stacked (n, ...) in this tap's values."""
    prefix = self.prefix + name + "."
    step_patches = {k: v for k, v in self.patches.items() if k.startswith(prefix)}

    def body(c, i):
      child = Tap(self.bases, self.names, step_patches, self.seen, prefix, i)
      with hooks.active(child):
        c = fn(c, i)
      return c, child.values

    carry, values = jax.lax.scan(body, carry, jnp.arange(n))
    self.values.update(values)
    return carry


def _apply(name, patch, value, step):
  new = patch(value) if callable(patch) else (patch if step is None else patch[step])
  new = jnp.asarray(new)
  if new.shape != value.shape:
    where = "" if step is None else " per step (the patch's leading axis is the step)"
    raise ValueError(f"patches[{name!r}]: shape {new.shape} where the activation is {value.shape}{where}")
  return new.astype(value.dtype)


def step():
  """The traced step index of the pass being traced (thought, recurrence, denoising step), or None."""
  t = hooks.current()
  return None if t is None else t.step


def at(source, positions=None, axis=1, steps=None):
  """A patch callable that copies source into the value at index `positions` (int or int array, traced is
  fine; None: everything) along `axis` of one pass's value. source is the captured value of that name, with
  its leading step axis for stepped names (each step then takes its own slice); steps (int or sequence)
  limits a stepped patch to those steps."""
  def fn(value):
    s = step()
    src = jnp.asarray(source) if s is None else jnp.asarray(source)[s]
    if positions is None:
      new = src.astype(value.dtype)
    else:
      idx = (slice(None),) * axis + (positions,)
      new = value.at[idx].set(src[idx].astype(value.dtype))
    if steps is None:
      return new
    if s is None:
      raise ValueError("at(..., steps=...) is for stepped names (thoughts., core., steps.)")
    return jnp.where(jnp.isin(s, jnp.atleast_1d(jnp.asarray(steps))), new, value)
  return fn


def point(name, value):
  """Record / patch a driver-level activation in the active pass."""
  return hooks.current().point(name, value)


# ---------------------------------------------------------------- names of modules


def _block_bases(block, base):
  out = {id(block): base + "."}
  mixer = block.mixer
  if isinstance(mixer, Attention):
    out[id(mixer)] = base + ".attn."
  elif isinstance(mixer, mamba2.Mamba2):
    out[id(mixer)] = base + ".ssm."
  elif isinstance(mixer, gated_deltanet.GatedDeltaNet):
    out[id(mixer)] = base + ".gdn."
  else:  # "P": the Parallel module taps attn.out / ssm.out itself
    out.update({id(mixer): base + ".", id(mixer.attn): base + ".attn.", id(mixer.ssm): base + ".ssm."})
  return out


def _backbone_bases(bb, prefix, block_name=lambda i: f"blocks.{i}"):
  out = {id(bb): prefix, id(bb.final_norm): prefix + "final_norm"}
  for i, block in enumerate(bb.blocks):
    out.update(_block_bases(block, prefix + block_name(i)))
  return out


def _recurrent_block_name(cfg):
  core_end = len(cfg.pattern) - cfg.coda
  return lambda i: f"prelude.blocks.{i}" if i < cfg.prelude else (f"blocks.{i}" if i < core_end else
                                                                     f"coda.blocks.{i}")


def _blt_bases(model):
  out = {id(model.encoder_norm): "encoder.final_norm", id(model.decoder_norm): "decoder.final_norm",
         **_backbone_bases(model.global_model, "global.")}
  for part in ("encoder", "decoder"):
    for i, block in enumerate(getattr(model, part)):
      out.update(_block_bases(block, f"{part}.blocks.{i}"))
  return out


# ---------------------------------------------------------------- family drivers: the forward pass, named
# Each calls its family's own forward; stepped families run their loop through archs.hooks.loop (Tap.loop names
# the steps) and expose their per-step vector through `intervene`, where the driver puts a named point.


def _lm(model, tokens, segment_ids=None):
  return model(tokens, segment_ids_BL=segment_ids)[0]


def _denoise_logits(model, z_BL):
  """The denoiser's logits (b, l, vocab) on z, as diffusion's sampler calls it."""
  cfg = model.cfg
  b, l = z_BL.shape
  seg = diffusion._segments(cfg, z_BL)
  if cfg.block_size:
    positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(l), jnp.arange(l)]), (b, 2 * l))
    logits, _ = model(jnp.concatenate([z_BL, z_BL], 1), positions, jnp.concatenate([seg, seg], 1),
                      attn_mask=diffusion.bd3_mask(l, cfg.block_size))
    return logits[:, :l]
  return model(z_BL, segment_ids_BL=seg)[0]


def _diffusion(model, tokens, steps=0):
  if not steps:
    return _denoise_logits(model, tokens)
  mask_id = model.cfg.mask_id

  def one(z, i):
    z = point("canvas", z)
    log_probs = diffusion.subs_log_probs(_denoise_logits(model, z), z, mask_id)
    x, conf = jnp.argmax(log_probs, -1).astype(z.dtype), jnp.max(log_probs, -1)
    masked = z == mask_id
    k = jnp.ceil(jnp.sum(masked, 1, keepdims=True) / (steps - i)).astype(jnp.int32)
    rank = jnp.argsort(jnp.argsort(-jnp.where(masked, conf, -jnp.inf), axis=1), axis=1)
    return jnp.where(masked & (rank < k), x, z)

  return hooks.loop("steps", one, tokens, steps)


def _coconut(model, tokens, segment_ids=None):
  return coconut.forward(model, tokens, segment_ids, recompute=True, intervene=lambda i, vec: point("vector", vec))


def _recurrent(model, tokens, segment_ids=None, iters=None, s0=None):
  cfg = model.cfg
  x = point("embed", model.embed_tokens(tokens))  # the prelude calls its blocks directly: no backbone embed tap
  s0 = recurrent.initial_state(cfg, jax.random.key(0), x.shape) if s0 is None else s0
  iters = cfg.iters_at_test if iters is None else iters
  return recurrent.run_fixed(model, x, iters, s0, segment_ids, lambda i, s: point("state", s))[0]


def _megabyte(model, tokens):
  return model(tokens)


def _blt(model, tokens, starts=None):
  starts = point("patch_starts", model.patch(tokens)[0] if starts is None else starts)
  return model(tokens, starts)[0]


DRIVERS = {  # family -> (forward with named points, module names)
    "lm": (_lm, lambda m: _backbone_bases(m.backbone, "")),
    "diffusion": (_diffusion, lambda m: _backbone_bases(m.backbone, "")),
    "coconut": (_coconut, lambda m: _backbone_bases(m.backbone, "")),
    "recurrent": (_recurrent, lambda m: _backbone_bases(m.backbone, "", _recurrent_block_name(m.cfg))),
    "megabyte": (_megabyte, lambda m: {**_backbone_bases(m.global_model, "global."),
                                       **_backbone_bases(m.local_model, "local.")}),
    "blt": (_blt, _blt_bases),
}


def family_of(model):
  """The archs.FAMILIES name of a built model."""
  if isinstance(model, recurrent.Recurrent):
    return "recurrent"
  if isinstance(model, megabyte.MegaByte):
    return "megabyte"
  if isinstance(model, blt.BLT):
    return "blt"
  if isinstance(model, lm.LM):
    cfg = model.cfg
    return "diffusion" if isinstance(cfg, diffusion.Config) else "coconut" if isinstance(cfg, coconut.Config) else "lm"
  raise ValueError(f"model of type {type(model).__name__}: no capture driver; families with one: {sorted(DRIVERS)}")


# ---------------------------------------------------------------- entry points


def trace(model, inputs, names=None, patches=None, **forward_kw):
  """(out, cache) of one forward pass with the named activations kept and patches applied; not jitted."""
  driver, bases = DRIVERS[family_of(model)]
  names = None if names is None else tuple([names] if isinstance(names, str) else names)
  patches = dict(patches or {})
  seen = set()
  t = Tap(bases(model), names, patches, seen)
  with hooks.active(t):
    out = driver(model, jnp.asarray(inputs), **forward_kw)
  unknown = sorted(set(patches) - seen)
  unmatched = [p for p in names or () if not any(fnmatch.fnmatchcase(s, p) for s in seen)]
  if unknown or unmatched:
    what = f"patches {unknown}" if unknown else f"names {unmatched}"
    raise ValueError(f"{what}: no such activation in this {family_of(model)} model; it has {sorted(seen)}")
  return out, t.values


def _split_kw(forward_kw):
  static = tuple(sorted((k, v) for k, v in forward_kw.items() if v is None or isinstance(v, (bool, int, float, str))))
  dynamic = {k: v for k, v in forward_kw.items() if k not in dict(static)}
  return static, dynamic


@functools.partial(jax.jit, static_argnames=("graphdef", "names", "static_kw", "patch_fns"))
def _run(state, inputs, dynamic_kw, patch_arrays, *, graphdef, names, static_kw, patch_fns):
  model = nnx.merge(graphdef, state)
  return trace(model, inputs, names, {**patch_arrays, **dict(patch_fns)}, **dynamic_kw, **dict(static_kw))


def run_with_cache(model, inputs, names=None, patches=None, **forward_kw):
  """(out, cache): the family's forward output and {name: activation} for the requested names (jitted)."""
  graphdef, state = nnx.split(model)
  static_kw, dynamic_kw = _split_kw(forward_kw)
  patches = dict(patches or {})
  fns = tuple(sorted(((k, v) for k, v in patches.items() if callable(v)), key=lambda kv: kv[0]))
  arrays = {k: jnp.asarray(v) for k, v in patches.items() if not callable(v)}
  names = None if names is None else tuple([names] if isinstance(names, str) else names)
  return _run(state, jnp.asarray(inputs), dynamic_kw, arrays, graphdef=graphdef, names=names, static_kw=static_kw,
              patch_fns=fns)


def run_with_patches(model, inputs, patches, **forward_kw):
  """The family's forward output with the named activations replaced (jitted)."""
  return run_with_cache(model, inputs, names=(), patches=patches, **forward_kw)[0]
