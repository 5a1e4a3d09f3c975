"""Model families, registered by name. Each family module has Config, build, loss, generate, flops_per_token."""

import importlib

FAMILIES = {
    "lm": "archs.lm",  # autoregressive LM on any backbone pattern; "AAAA" is the transformer baseline
}


def get_family(name):
  if name not in FAMILIES:
    raise ValueError(f"family={name!r} is not registered; valid: {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[name])
