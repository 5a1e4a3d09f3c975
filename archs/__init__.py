"""Model families, registered by name. Each family module has Config, build, loss, generate, flops_per_token."""

import importlib

FAMILIES = {
    "lm": "altbench.archs.lm",  # autoregressive LM on any backbone pattern; "AAAA" is the transformer baseline
    "diffusion": "altbench.archs.diffusion",  # masked diffusion (MDLM) and block diffusion (BD3-LM)
    "coconut": "altbench.archs.coconut",  # continuous thoughts (Coconut) on any causal backbone; thoughts=0 is "lm"
    "recurrent": "altbench.archs.recurrent",  # recurrent depth (Huginn): prelude, core iterated r times, coda
    "megabyte": "altbench.archs.megabyte",  # bytes: global model over fixed patches, local model inside each
    "blt": "altbench.archs.blt",  # bytes: Byte Latent Transformer, fixed / space / entropy patches, hash n-grams
}


def get_family(name):
  if name not in FAMILIES:
    raise ValueError(f"family={name!r} is not registered; valid: {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[name])


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
