"""Accelerated ops, each with a plain reference, an XLA path and (later) Pallas kernels."""

from altbench.kernels.attention import attention
from altbench.kernels.gated_delta import gated_delta
from altbench.kernels.ssd import ssd

__all__ = ["attention", "gated_delta", "ssd"]
