"""Named activation points (taps) in the shared layers, for interp.capture: a no-op unless a tap is active.

A layer calls `tap(self, "resid_pre", x)` where an activation worth reading or replacing is made. With no
active tap (training, evaluation, sampling) it returns x untouched at trace time, so the compiled program is
exactly the one without taps. interp.capture pushes a tap object while it traces a forward pass; the tap
names the activation from the module's place in the model, records it and may return a replacement.
Extra work that only interpretability needs (attention probabilities, per-position SSM states) is done only
where `wants(self, name)` says a tap asked for it.

Nothing here imports the rest of the project; interp owns the naming and the tap objects.
"""

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
