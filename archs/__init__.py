"""Model families, registered by name; each family module satisfies the Family protocol (get_family checks it)."""

import importlib
import typing

FAMILIES = {
    "lm": "altbench.archs.lm",  # autoregressive LM on any backbone pattern; "AAAA" is the transformer baseline
    "diffusion": "altbench.archs.diffusion",  # masked diffusion (MDLM) and block diffusion (BD3-LM)
    "coconut": "altbench.archs.coconut",  # continuous thoughts (Coconut) on any causal backbone; thoughts=0 is "lm"
    "recurrent": "altbench.archs.recurrent",  # recurrent depth (Huginn): prelude, core iterated r times, coda
    "megabyte": "altbench.archs.megabyte",  # bytes: global model over fixed patches, local model inside each
    "blt": "altbench.archs.blt",  # bytes: Byte Latent Transformer, fixed / space / entropy patches, hash n-grams
}


@typing.runtime_checkable
class Family(typing.Protocol):
  """What the training loop, the ledger and the arena call on a family module (all required).

  Optional, used when present (OPTIONAL):
    eval_loss(model, batch, rng) -> (loss, metrics)  held-out scoring when it differs from loss (recurrent: fixed r)
    check_data(cfg, layout)  raises ValueError when the data does not fit cfg; layout is the reasoning task's
                             resolved layout (train.reasoning_tasks.layout) or None for other data
    frozen_runs(cfg) -> {build keyword: run directory}  trained models the model embeds frozen (BLT's entropy
                             model); the loop loads each and passes it to build (train.step.build_model)
  A family whose forward pass is stepped (Coconut's thoughts, recurrent depth's core) runs its loop through
  archs.hooks.loop and takes an `intervene` callback, so that interp reads and replaces the steps of that one
  loop rather than a copy of it.
  """

  Config: type  # frozen dataclass of the model's fields, with validate() raising ValueError on a bad one

  def build(self, cfg, rngs):
    """The nnx.Module for cfg (with frozen_runs' models as keywords, where the family has them)."""

  def loss(self, model, batch, rng):
    """(scalar loss, metrics of sums: nats, tokens, bytes, ...) on one batch."""

  def generate(self, model, prompt_BT, max_new_tokens, rng, *, temperature=1.0, top_k=0, top_p=1.0):
    """(b, T + max_new_tokens) ids: the prompts continued by the family's own decoding."""

  def flops_per_token(self, cfg, seq_len):
    """Analytic training FLOPs per token (forward and backward) for the compute ledger."""


REQUIRED = tuple(sorted(set(Family.__annotations__) | {n for n, v in vars(Family).items()
                                                        if callable(v) and not n.startswith("_")}))
OPTIONAL = ("check_data", "eval_loss", "frozen_runs")


def check_family(name, module):
  """module, when it provides every REQUIRED attribute (and OPTIONAL ones it has are callable); else TypeError."""
  missing = [a for a in REQUIRED if not callable(getattr(module, a, None))]
  missing += [a for a in OPTIONAL if hasattr(module, a) and not callable(getattr(module, a))]
  if missing or not isinstance(module, Family):
    raise TypeError(f"family {name!r} ({module.__name__}) is not an archs.Family: {missing} missing or not "
                    f"callable; a family module provides {list(REQUIRED)} (optional: {list(OPTIONAL)})")
  return module


def get_family(name):
  if name not in FAMILIES:
    raise ValueError(f"family={name!r} is not registered; valid: {sorted(FAMILIES)}")
  return check_family(name, importlib.import_module(FAMILIES[name]))


def param_count(family_name, cfg):
  """Number of parameters of a family's model for cfg, without allocating them."""
  import jax
  from flax import nnx
  family = get_family(family_name)
  state = nnx.state(nnx.eval_shape(lambda: family.build(cfg, nnx.Rngs(0))), nnx.Param)
  return sum(x.size for x in jax.tree.leaves(state))


def match_params(family_name, cfg, target, field="d_ff", step=32):
  """cfg with `field` (an integer width) chosen so the parameter count comes closest to target."""
  import dataclasses
  lo, hi = step, 16 * cfg.d_model
  while hi - lo > step:  # the count grows with the width: bisect
    mid = (lo + hi) // 2 // step * step
    lo, hi = (mid, hi) if param_count(family_name, dataclasses.replace(cfg, **{field: mid})) < target else (lo, mid)
  candidates = [dataclasses.replace(cfg, **{field: width}) for width in (lo, hi)]
  return min(candidates, key=lambda c: abs(param_count(family_name, c) - target))
