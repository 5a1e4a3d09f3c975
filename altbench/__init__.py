"""altbench: a JAX/Flax NNX bench for alternative language-model architectures.

The packages `altbench.archs`, `altbench.kernels`, `altbench.train` and `altbench.interp` live in the
repository's top-level folders (pyproject maps them); `altbench.cli` is the `altbench` command.
"""

__version__ = "0.1.0"
