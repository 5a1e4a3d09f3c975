"""Patchers for byte models: where a byte sequence is cut into patches, identical in batch and decode mode.

A patching is a boolean array `starts` ("byte t starts a new patch"; byte 0 always does) and patch ids per
byte (cumsum(starts) - 1). Whether byte t starts a patch is decided from bytes < t only (and from a small
byte LM's entropies at positions < t), so a decoder knows at position t - 1 that the current patch ends
there. Batch mode runs the very same per-position rule as decode mode, as a scan, so the two agree exactly:

  fixed(P)    a patch every P bytes.
  space       a new patch after a space-like byte (not an ASCII letter or digit, not a byte >= 128 of a
              multi-byte character); merge_runs (SpaceByte's rule) only after the first space-like byte of a
              run, so indentation or ", " does not make one-byte patches. Mean patch ~8 bytes on Python source
              with merged runs, ~2.4 without.
  entropy     BLT: H(t) is the entropy (nats) of a byte LM's prediction of byte t from bytes < t; byte t starts
              a patch where H(t) > threshold (global rule) or H(t) - H(t - 1) > relative (monotonic rule).

Both data-dependent patchers take max_len (a patch closes once it holds max_len bytes; 0: no limit) and a
per-sequence cap of max_patches (fixed shapes under jit): once that many patches have started no new one
starts, and the last patch takes the rest of the sequence ("capped" counts those lost boundaries).

The entropy model is any byte-level `lm` model, frozen: `EntropyModel` wraps one (the training loop loads a
trained `lm` run directory's model, `train.loop.load_model`); `run_lm_config` reads such a run's model shape
(its FLOPs are part of BLT's); `calibrate_threshold` picks the global threshold that gives a target mean
patch length on sample bytes.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

KINDS = ("fixed", "space", "entropy")
_MISSING_BYTE = -1  # the "byte" before the start of a sequence: space-like, as at a document start


def spacelike(x):
  """True for bytes that are not an ASCII letter or digit and not part of a multi-byte UTF-8 character."""
  alnum = (((x >= 48) & (x <= 57)) | ((x >= 65) & (x <= 90)) | ((x >= 97) & (x <= 122))
           | ((x >= 128) & (x < 256)))
  return ~alnum


def entropy(logits_BLV):
  """Entropy in nats of softmax(logits) along the last axis."""
  logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@dataclasses.dataclass(frozen=True)
class Patcher:
  kind: str = "fixed"
  size: int = 4              # fixed: the patch length
  merge_runs: bool = True    # space: a run of space-like bytes stays in one patch
  threshold: float = 0.0     # entropy: global threshold in nats (0: rule off)
  relative: float = 0.0      # entropy: threshold on the rise over the previous byte's entropy (0: rule off)
  max_len: int = 0           # space, entropy: longest patch (0: no limit)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"patcher kind={self.kind!r}: valid: {KINDS}")
    if self.kind == "fixed" and self.size < 1:
      raise ValueError(f"fixed patcher size={self.size}: must be positive")
    if self.kind == "entropy" and self.threshold <= 0 and self.relative <= 0:
      raise ValueError("entropy patcher: set threshold > 0 (global rule) and/or relative > 0 (monotonic rule)")
    if self.max_len < 0:
      raise ValueError(f"max_len={self.max_len}: must be >= 0 (0: no limit)")

  @property
  def needs_entropy(self):
    return self.kind == "entropy"

  # ---------------------------------------------------------------- one position (shared by both modes)

  def _wants(self, t, x1, x2, h1, h2):
    """Does byte t want to start a patch, from the two bytes (x1 = x[t-1], x2 = x[t-2]) and entropies before it.

    h1 = H(t), the entropy of the prediction of byte t (computed from bytes < t); h2 = H(t - 1).
    """
    if self.kind == "fixed":
      return t % self.size == 0
    if self.kind == "space":
      return spacelike(x1) & ~spacelike(x2) if self.merge_runs else spacelike(x1)
    want = jnp.zeros(jnp.shape(h1), bool)
    if self.threshold > 0:
      want = want | (h1 > self.threshold)
    if self.relative > 0:
      want = want | (h1 - h2 > self.relative)
    return want

  def _advance(self, count, run, want, max_patches):
    """Apply max_len and the max_patches cap to the wish; returns (starts, count, run, capped)."""
    if self.kind == "fixed":
      go = want
    else:
      go = want | (run >= self.max_len) if self.max_len else want
    start = go & (count < max_patches)
    return start, count + start, jnp.where(start, 1, run + 1), go & ~start

  # ---------------------------------------------------------------- decode mode

  def init(self, batch):
    """State after byte 0 (which always starts patch 0): patches so far, the open patch's length, the last
    byte and the last entropy."""
    ones = jnp.ones((batch,), jnp.int32)
    return {"t": jnp.zeros((), jnp.int32), "count": ones, "run": ones,
            "x1": jnp.full((batch,), _MISSING_BYTE, jnp.int32), "h1": jnp.full((batch,), jnp.inf, jnp.float32)}

  def step(self, state, x_B, h_B, max_patches):
    """After reading byte t (x_B) and the entropy H(t + 1) of the prediction of the next byte (h_B, ignored
    unless entropy patching): does byte t + 1 start a patch? Returns (state, starts_B, capped_B)."""
    t = state["t"] + 1
    h_B = jnp.zeros(x_B.shape, jnp.float32) if h_B is None else h_B.astype(jnp.float32)
    want = self._wants(t, x_B, state["x1"], h_B, state["h1"])
    want = jnp.broadcast_to(want, x_B.shape)
    start, count, run, capped = self._advance(state["count"], state["run"], want, max_patches)
    return {"t": t, "count": count, "run": run, "x1": x_B, "h1": h_B}, start, capped

  # ---------------------------------------------------------------- batch mode

  def batch(self, x_BL, h_BL=None, *, max_patches):
    """starts (b, L + 1) and capped (b, L + 1) for bytes 0..L: entry L says whether byte L-1 ends a patch.

    h_BL[:, t] is the entropy H(t + 1) of the LM's prediction after reading byte t (None unless entropy).
    Runs `step` over the sequence, so it equals decode mode by construction.
    """
    b, l = x_BL.shape
    if self.kind == "fixed":  # closed form, identical to the scan (the cap never binds: see max_patches)
      starts = jnp.broadcast_to(jnp.arange(l + 1) % self.size == 0, (b, l + 1))
      capped = starts & (jnp.arange(l + 1) // self.size >= max_patches)
      return starts & ~capped, capped
    if h_BL is None:
      h_BL = jnp.zeros((b, l), jnp.float32)

    def body(state, xs):
      x_B, h_B = xs
      state, start, capped = self.step(state, x_B, h_B, max_patches)
      return state, (start, capped)

    _, (starts, capped) = jax.lax.scan(body, self.init(b), (x_BL.T, h_BL.T))
    first = jnp.ones((b, 1), bool)
    return jnp.concatenate([first, starts.T], 1), jnp.concatenate([~first, capped.T], 1)

  def max_patches(self, length, min_mean_patch):
    """Patch slots per sequence of `length` bytes: exactly enough for fixed(P), else length / min_mean_patch."""
    if self.kind == "fixed":
      return -(-length // self.size)
    return max(1, -(-length // max(1, min_mean_patch)))


def patch_layout(starts_BL1):
  """From starts (b, L + 1): patch ids (b, L), and `closed` (b, L), the number of patches that have ended at
  or before each byte (a byte may read the patches with id < closed)."""
  ids = jnp.cumsum(starts_BL1[:, :-1].astype(jnp.int32), axis=1) - 1
  return ids, ids + starts_BL1[:, 1:].astype(jnp.int32)


# ---------------------------------------------------------------- the entropy model


class Frozen(nnx.Variable):
  """A weight that is not trained: not an nnx.Param, so the train step leaves it alone (it is in "rest")."""


def freeze(module):
  """Turn every nnx.Param of module into a Frozen variable (in place); returns module."""
  for _, node in list(nnx.iter_graph(module)):
    if isinstance(node, nnx.Module):
      for name, value in list(vars(node).items()):
        if isinstance(value, nnx.Param):
          setattr(node, name, Frozen(value[...]))
  return module


class EntropyModel(nnx.Module):
  """A frozen byte-level `lm` model that gives next-byte entropies, for a whole sequence or byte by byte."""

  def __init__(self, lm_model):
    self.lm = freeze(lm_model)

  def entropies(self, x_BL):
    """(b, L): entry t is the entropy of the prediction of byte t + 1 after reading bytes <= t."""
    logits, _ = self.lm(x_BL)
    return jax.lax.stop_gradient(entropy(logits))

  def init_cache(self, batch, max_len):
    from altbench.archs import backbone
    return backbone.init_cache(self.lm.cfg, batch, max_len)

  def step(self, x_B, cache, index):
    logits, cache = self.lm(x_B[:, None], cache=cache, cache_index=index)
    return jax.lax.stop_gradient(entropy(logits[:, 0])), cache

  def forward_flops_per_token(self, seq_len):
    return lm_forward_flops(self.lm.cfg, seq_len)


def lm_forward_flops(cfg, seq_len):
  from altbench.archs import backbone
  return backbone.forward_flops_per_token(cfg, seq_len) + 2 * cfg.d_model * cfg.vocab_size


def run_lm_config(run_dir):
  """The lm.Config of a trained `lm` run directory (its config.json), checked to be a byte-level model."""
  from altbench.archs import lm
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"patcher_run={run_dir!r}: no config.json (train a byte `lm` run there first)")
  saved = json.load(open(path))["config"]
  if saved["family"] != "lm" or saved["data"]["tokenizer"] != "bytes":
    raise ValueError(f"patcher_run={run_dir!r}: family {saved['family']!r} tokenizer "
                     f"{saved['data']['tokenizer']!r}; the entropy model must be a byte-level `lm` run")
  fields = {f.name for f in dataclasses.fields(lm.Config)}
  return lm.Config(**{k: v for k, v in saved["model"].items() if k in fields})


def calibrate_threshold(entropy_model, x_NL, target_mean_len, *, max_len=0, relative=False, iters=40):
  """The entropy threshold (global rule, or the monotonic one with relative=True) whose patching of the
  sample windows x_NL has the mean patch length closest to target_mean_len (bisection: the mean length grows
  with the threshold). h > theta is h / theta > 1, so one compiled patching serves every theta."""
  x_NL = jnp.asarray(x_NL, jnp.int32)
  h_NL = jax.jit(entropy_model.entropies)(x_NL)
  unit = Patcher("entropy", threshold=0.0 if relative else 1.0, relative=1.0 if relative else 0.0, max_len=max_len)
  lo, hi = 1e-3, float(jnp.max(h_NL) - (jnp.min(h_NL) if relative else 0.0)) + 1.0
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    longer = mean_patch_len(unit, x_NL, h_NL / mid) < target_mean_len
    lo, hi = (mid, hi) if longer else (lo, mid)
  return 0.5 * (lo + hi)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _batch_jit(patcher, x_BL, h_BL, max_patches):
  return patcher.batch(x_BL, h_BL, max_patches=max_patches)


def mean_patch_len(patcher, x_NL, h_NL=None):
  """Mean patch length of a patcher on windows x_NL (no cap on the number of patches)."""
  x_NL = jnp.asarray(x_NL, jnp.int32)
  starts, _ = _batch_jit(patcher, x_NL, h_NL, x_NL.shape[1])
  return float(x_NL.size / jnp.sum(starts[:, :-1]))
