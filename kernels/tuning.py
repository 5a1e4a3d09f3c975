"""Tuned block sizes: one small JSON table per machine kind, read by the kernels' dispatch, written by
`altbench bench kernels --tune` (experiments/bench/kernels.py).

An entry is keyed by (op, device kind, shape class) and holds the tile parameters that measured fastest
for that op on that device kind, e.g.

    {"flash_attention|NVIDIA H100 80GB HBM3|d128": {"block_q": 128, "block_k": 64, ...}}

Ops and their shape classes (every op keeps its hand-written defaults when no entry matches):
  flash_attention  d64 / d128 / d256 (head_dim class)       -> flash_attention.BlockSizes fields
  ssd_pallas       p<headdim class>n<dstate class>          -> ssd_pallas.BlockSizes fields (GPU kernels)
  gated_delta_pallas k<dk class>v<dv class>                 -> gated_delta_pallas.BlockSizes fields (GPU kernels)
  attention_xla    d<head_dim class>                        -> {"causal_block": query block of the causal XLA path}
  ssd_xla          p<headdim class>n<dstate class>          -> {"cpu_block_bytes": working set of a block of chunks}
  attention_gpu_impl d<head_dim class>                      -> {"impl": "cudnn" | "pallas"}: the fused attention
                                                               impl="auto" runs on this GPU (default pallas)

The table read is the file named by ALTBENCH_KERNEL_TABLE if set, else `tuned_blocks.json` next to this
module (what the project ships). Lookups happen at trace time, so a changed table needs a new trace.

Tuning is a bounded search: a fixed, ordered candidate list per (op, shape class), each measured the same
number of times, the median kept; the choice is the first candidate (in list order) within `tolerance` of
the fastest median, so noise between near-equal candidates cannot flip the choice back and forth.
"""

import json
import os

import jax
import jax.numpy as jnp

TABLE_ENV = "ALTBENCH_KERNEL_TABLE"
DEFAULT_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned_blocks.json")
_cache = {}


def forced_impl(variable, valid=("xla", "pallas", "reference")):
  """The impl an environment variable (ALTBENCH_ATTENTION_AUTO, ALTBENCH_SSD_AUTO, ALTBENCH_GATED_DELTA_AUTO)
  forces on impl="auto", or "" where it is unset; `valid` lists what the op accepts."""
  forced = os.environ.get(variable, "")
  if forced and forced not in valid:
    raise ValueError(f"{variable}={forced!r}: expected one of {', '.join(valid)}")
  return forced


def pallas_dtype_pays(target, dtype):
  """Whether impl="auto" may pick a Pallas kernel for inputs of `dtype` on `target`. On GPU only 16-bit
  inputs: float32 operands run the Triton dots at HIGHEST precision, off the tensor cores (SSD at a
  124M hybrid's layer shape on an H100: 31.3 ms in float32, 1.0 ms in bf16), while XLA's float32 dots
  may use TF32."""
  return target != "gpu" or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def table_path():
  return os.environ.get(TABLE_ENV) or DEFAULT_TABLE


def device_kind(device=None):
  return (device or jax.devices()[0]).device_kind


def size_class(n, classes=(64, 128, 256)):
  """The smallest class that holds n (the last one for anything larger)."""
  return next((c for c in classes if n <= c), classes[-1])


def ssd_class(headdim, dstate):
  """The shape class of an SSD call (ssd_pallas and ssd_xla entries)."""
  classes = (16, 32, 64, 128, 256)
  return f"p{size_class(headdim, classes)}n{size_class(dstate, classes)}"


def gated_delta_class(dk, dv):
  """The shape class of a gated delta rule call (gated_delta_pallas entries)."""
  classes = (16, 32, 64, 128, 256)
  return f"k{size_class(dk, classes)}v{size_class(dv, classes)}"


def key(op, kind, shape_class):
  return f"{op}|{kind}|{shape_class}"


def read_table(path=None):
  """The table as a dict (empty when the file does not exist). A malformed file is an error naming it."""
  path = path or table_path()
  try:
    mtime = os.path.getmtime(path)
  except OSError:
    return {}
  if _cache.get(path, (None,))[0] != mtime:
    try:
      with open(path) as f:
        table = json.load(f)
    except ValueError as e:
      raise ValueError(f"kernel block table {path}: not valid JSON ({e}); fix or delete it, or set "
                       f"{TABLE_ENV} to another file") from e
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
      raise ValueError(f"kernel block table {path}: expected an object of {{'op|device kind|class': {{...}}}}")
    _cache[path] = (mtime, table)
  return _cache[path][1]


def lookup(op, shape_class, kind=None):
  """The tuned parameters for op on this device kind and shape class, or None."""
  return read_table().get(key(op, kind or device_kind(), shape_class))


def write_entries(entries, path=None):
  """Merge {key: params} into the table file atomically (other devices' and ops' entries are kept)."""
  path = path or table_path()
  table = dict(read_table(path))
  table.update(entries)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(table, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  _cache.pop(path, None)
  return table


def choose(candidates, medians, tolerance=0.03):
  """Index of the first candidate whose median time is within (1 + tolerance) of the fastest.

  Candidates that failed (median None: did not compile or raised) are never chosen; all failing is an error.
  """
  ok = [m for m in medians if m is not None]
  if not ok:
    raise RuntimeError(f"every candidate failed: {candidates}")
  best = min(ok)
  return next(i for i, m in enumerate(medians) if m is not None and m <= best * (1 + tolerance))
