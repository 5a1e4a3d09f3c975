"""Named activation points (taps) in the shared layers, for interp.capture: a no-op unless a tap is active.

A layer calls `tap(self, "resid_pre", x)` where an activation worth reading or replacing is made. With no
active tap (training, evaluation, sampling) it returns x untouched at trace time, so the compiled program is
exactly the one without taps. interp.capture pushes a tap object while it traces a forward pass; the tap
names the activation from the module's place in the model, records it and may return a replacement.
Extra work that only interpretability needs (attention probabilities, per-position SSM states) is done only
where `wants(self, name)` says a tap asked for it.

A family's own sequential loop (Coconut's thought passes, recurrent depth's core) runs through
`loop(name, fn, carry, n)`: a fori_loop without a tap, and with one, the tap's own loop, which names each
step's activations ("thoughts.blocks.0.resid_post") and stacks them along a leading step axis.

Nothing here imports the rest of the project; interp owns the naming and the tap objects.
"""

import jax

_ACTIVE = []  # the tap stack; only the innermost one sees activations


def tap(module, name, value):
  """value, or the active tap's replacement for module's activation `name`."""
  return _ACTIVE[-1].visit(module, name, value) if _ACTIVE else value


def wants(module, name):
  """Whether the active tap records or replaces module's activation `name` (False when none is active)."""
  return bool(_ACTIVE) and _ACTIVE[-1].wants(module, name)


def replaces(module, name):
  """Whether the active tap replaces module's activation `name` (then the layer must use the replacement)."""
  return bool(_ACTIVE) and _ACTIVE[-1].replaces(module, name)


def loop(name, fn, carry, n):
  """carry after carry = fn(carry, i) for i < n: the family's stepped pass `name`, seen per step by the active tap.

  Without a tap it is the plain fori_loop (n may be traced); the active tap runs it itself (interp.capture: a
  scan, n static, each step's activations recorded under "name." with the step's index)."""
  if _ACTIVE:
    return _ACTIVE[-1].loop(name, fn, carry, n)
  return jax.lax.fori_loop(0, n, lambda i, c: fn(c, i), carry)


class active:
  """`with active(t):` makes t the innermost tap while tracing the body."""

  def __init__(self, t):
    self.t = t

  def __enter__(self):
    _ACTIVE.append(self.t)
    return self.t

  def __exit__(self, *exc):
    _ACTIVE.pop()


def current():
  """The innermost active tap, or None."""
  return _ACTIVE[-1] if _ACTIVE else None
