"""Accelerated ops, each with a plain reference, an XLA path and (later) Pallas kernels."""

from kernels.attention import attention
from kernels.ssd import ssd

__all__ = ["attention", "ssd"]
