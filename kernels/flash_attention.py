"""Flash attention as Pallas kernels (forward and backward) for GPU (Triton) and TPU (Mosaic).

``flash_attention(q, k, v, causal=..., segment_ids=..., softmax_scale=...)`` computes the same thing
as ``kernels.attention``'s reference, softmax(q k^T * scale + mask) v with grouped KV heads, without
ever materialising the (T, S) score matrix: each program keeps one tile of queries and streams the
keys and values past it, keeping a running max and sum (online softmax, FlashAttention-2). It is
differentiable through ``jax.custom_vjp``; the forward saves only the output and the per-row
log-sum-exp (as its two parts, see Numerics), and the backward recomputes the probabilities tile by
tile.

This module is the public entry (block sizes, padding, the custom_vjp); the kernels live in one
module per target, chosen from ``jax.default_backend()`` (or ``target=``) through ``_BACKENDS``:

* ``"gpu"``: kernels/flash_attention_gpu.py, Pallas on the Triton backend, layout (b, L, h, d).
* ``"tpu"``: kernels/flash_attention_tpu.py, Pallas TPU (Mosaic), layout (b, h, L, d).

Both take the same arguments and return the same results, each in its own layout, so one custom_vjp
serves both; what they share (masking, the matmul, index math) is in kernels/pallas_common.py.

Backward strategy (both targets): FlashAttention-2's, two separate kernels. ``delta = rowsum(o * do)``
is computed by XLA (one fused elementwise-reduce), then a dk/dv kernel parallel over kv blocks and a
dq kernel parallel over q blocks; no atomics, each output written once.

Numerics. Products run on the matrix units in the input dtype with float32 accumulation (float32
inputs use ``Precision.HIGHEST``, i.e. no TF32); softmax statistics are float32 and kept in base 2
(scores are multiplied by scale * log2(e) and exponentiated with exp2, which is cheaper than exp on
GPUs). The residual is the base-2 log-sum-exp kept as its two terms, row max m and log2(row sum),
and the backward forms p = exp2((s - m) - log2 l): for a row that sees no key m is the mask value
(~-2.4e38) and m + log2 l would round back to m, losing the 1/l of its uniform average (its dv would
come out l times too large). Masked scores get the same large finite value as the reference (-0.7 *
float32 max), so a query row that sees no key gets the uniform average over the keys the kernel
visits; padding keys get float32 min so they never enter that average. The one
divergence from the reference: a row with no visible key under ``causal=True`` (possible only with
``segment_ids=(q_ids, kv_ids)``) averages over keys up to its diagonal block, the reference over
all keys. Gradients at masked positions are zero, as in the reference.

Lengths that are not block multiples are padded (zeros) up to the block size and sliced back; pad
keys are masked, pad query rows get a row max of +float32 max in the backward so they contribute
exactly nothing. A head_dim that Triton cannot tile (not a power of two, or < 16) is zero-padded too.

A dense boolean ``mask`` is not supported here (``kernels.attention`` falls back to XLA for it).
On CPU (or with ``interpret=True``) the kernels run in Pallas interpret mode: slow, for tests only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from altbench.kernels import flash_attention_gpu, flash_attention_tpu, tuning
from altbench.kernels.pallas_common import LANES, LOG2E, TARGETS, backend_target, pow2_at_least, round_up

_BIG = float(np.finfo(np.float32).max)                 # m of pad query rows: exp2(s - _BIG) == 0
_BACKENDS = {"gpu": flash_attention_gpu, "tpu": flash_attention_tpu}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: forward (q, kv), dk/dv kernel (q, kv), dq kernel (q, kv); Triton warps and stages.

  The GPU-only fields after num_stages are issue 26's candidates against cuDNN (kernels/
  flash_attention_gpu.py describes each); their defaults are the kernels as they were, and the tuning
  table turns one on for a device kind only where `altbench bench kernels --tune` measured it faster:
  num_warps_dkdv / num_stages_dkdv / num_warps_dq / num_stages_dq: per-kernel launch parameters
    (None: num_warps / num_stages, which are the forward's);
  one_lse: save one log-sum-exp vector instead of its two terms;
  prescale_k: multiply k by scale * log2(e) once, in XLA, instead of every score tile in the kernels;
  fused_bwd: one backward kernel (dk, dv, and dq by atomic adds) instead of a dk/dv and a dq kernel.
  """
  block_q: int
  block_k: int
  block_q_dkv: int
  block_k_dkv: int
  block_q_dq: int
  block_k_dq: int
  num_warps: int = 4
  num_stages: int = 2
  num_warps_dkdv: int | None = None
  num_stages_dkdv: int | None = None
  num_warps_dq: int | None = None
  num_stages_dq: int | None = None
  one_lse: bool = False
  prescale_k: bool = False
  fused_bwd: bool = False


# Block sizes per (target, head_dim class): the class is the smallest of 64, 128, 256 that holds
# head_dim. They are clamped to the (padded) sequence lengths at call time. None of them has been
# tuned on hardware yet (no GPU/TPU when this was written); they follow the usual shapes:
# * GPU (Triton, sm80/sm90): the forward and dq kernels keep a (block_q, d) float32 accumulator in
#   registers, the dk/dv kernel two (block_k, d) ones, so the accumulated dimension shrinks as d
#   grows; the streamed dimension stays small in the backward (it holds two score-sized tiles).
#   8 warps from head_dim 128 up, 4 below; warps and stages are shared by the three kernels.
# * TPU: multiples of 128 along kv (lane dimension) and of 8/16 along q; large tiles amortise the
#   per-grid-step overhead (~0.35 us) and keep the MXU fed, bounded by ~16-32 MiB of scoped VMEM.
_BLOCKS = {
    ("gpu", 64): BlockSizes(128, 64, 32, 128, 128, 32, num_warps=4, num_stages=3),
    ("gpu", 128): BlockSizes(128, 64, 32, 64, 64, 32, num_warps=8, num_stages=2),
    ("gpu", 256): BlockSizes(64, 32, 16, 32, 32, 16, num_warps=8, num_stages=2),
    ("tpu", 64): BlockSizes(512, 512, 256, 512, 512, 256),
    ("tpu", 128): BlockSizes(512, 512, 256, 512, 512, 256),
    ("tpu", 256): BlockSizes(256, 256, 128, 256, 256, 128),
}
MAX_HEAD_DIM = 256


# The candidates `bench attention --candidates` times and `bench kernels --tune` chooses among, per head_dim
# class: name -> fields replaced in the default blocks. Launch parameters: the dk/dv kernel keeps two
# (block_k, d) float32 accumulators and recomputes p and ds, so it may want more warps than the forward.
GPU_CANDIDATES = {
    64: {"launch_dkdv8": dict(num_warps_dkdv=8, num_stages_dkdv=2),
         "launch_bwd8": dict(num_warps_dkdv=8, num_stages_dkdv=2, num_warps_dq=8, num_stages_dq=2),
         "one_lse": dict(one_lse=True), "prescale_k": dict(prescale_k=True),
         "lse_prescale": dict(one_lse=True, prescale_k=True),
         "fused_bwd": dict(fused_bwd=True),
         "fused_lse_prescale": dict(fused_bwd=True, one_lse=True, prescale_k=True)},
    128: {"launch_fwd4": dict(num_warps=4, num_stages=3, num_warps_dkdv=8, num_stages_dkdv=2,
                              num_warps_dq=8, num_stages_dq=2),
          "launch_dq4": dict(num_warps_dq=4, num_stages_dq=3),
          "one_lse": dict(one_lse=True), "prescale_k": dict(prescale_k=True),
          "lse_prescale": dict(one_lse=True, prescale_k=True),
          "fused_bwd": dict(fused_bwd=True),
          "fused_lse_prescale": dict(fused_bwd=True, one_lse=True, prescale_k=True)},
}


def head_dim_class(d):
  return next(c for c in (64, 128, 256) if d <= c)


def default_block_sizes(target, head_dim):
  """The tuned entry for this device kind (kernels/tuning.py) if there is one, else the table above."""
  tuned = tuning.lookup("flash_attention", f"d{head_dim_class(head_dim)}")
  return BlockSizes(**tuned) if tuned else _BLOCKS[(target, head_dim_class(head_dim))]


def supported(q_shape, k_shape, *, mask=None):
  """Whether flash_attention handles this call (kernels.attention's auto dispatch asks)."""
  return mask is None and q_shape[-1] <= MAX_HEAD_DIM


# --------------------------------------------------------------------------------------------
# One custom_vjp over the backend kernels


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static description of one call, on padded arrays (hashable: a custom_vjp nondiff argument)."""
  target: str       # a key of _BACKENDS
  causal: bool
  scale: float
  q_len: int        # real (unpadded) lengths
  kv_len: int
  has_seg: bool
  blocks: BlockSizes
  interpret: object  # False, True, or a pltpu.InterpretParams
  empty_rows: bool = False  # (q_ids, kv_ids) given: a query row may see no key at all

  @property
  def one_lse(self):
    # One vector m + log2 l rounds away the log2 l of a row that sees no key (m ~ -2.4e38): two there.
    return self.target == "gpu" and self.blocks.one_lse and not self.empty_rows

  @property
  def prescale(self):
    return self.target == "gpu" and self.blocks.prescale_k


def _kernel_k(k, c):
  """k as the kernels take it: times scale * log2(e) once here with prescale_k (saved as the residual)."""
  return (k * (c.scale * LOG2E)).astype(k.dtype) if c.prescale else k


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_ids, kv_ids, c):
  return _BACKENDS[c.target].fwd(q, _kernel_k(k, c), v, q_ids, kv_ids, c)[0]


def _flash_fwd(q, k, v, q_ids, kv_ids, c):
  k = _kernel_k(k, c)
  o, m, ll = _BACKENDS[c.target].fwd(q, k, v, q_ids, kv_ids, c)   # ll is None with c.one_lse
  return o, (q, k, v, q_ids, kv_ids, o, m, ll)


def _flash_bwd(c, res, do):
  q, k, v, q_ids, kv_ids, o, m, ll = res
  backend = _BACKENDS[c.target]
  layout = backend.LAYOUT
  delta = jnp.einsum(f"{layout},{layout}->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  # Per-row statistics are (b, h, T) on GPU and lane-replicated (b, h, T, 128) on TPU.
  lanes = tuple(range(3, m.ndim))
  delta = jnp.broadcast_to(jnp.expand_dims(delta, lanes), m.shape)
  real_row = jnp.expand_dims(jnp.arange(m.shape[2]) < c.q_len, tuple(a - 2 for a in lanes))
  m = jnp.where(real_row, m, _BIG)                           # pad rows: p == 0 everywhere
  dq, dk, dv = backend.bwd(q, k, v, q_ids, kv_ids, m, ll, delta, do.astype(q.dtype), c)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------------------------
# Public entry point


def _fit_blocks(bs, target, q_len, kv_len):
  """Clamp a BlockSizes to the lengths: no block longer than the padded sequence needs to be."""
  floor = 16 if target == "gpu" else LANES   # Triton dots need >= 16; TPU lanes are 128 wide
  fq = lambda x: min(x, max(floor, pow2_at_least(q_len)))
  fk = lambda x: min(x, max(floor, pow2_at_least(kv_len)))
  return dataclasses.replace(bs, block_q=fq(bs.block_q), block_k=fk(bs.block_k),
                             block_q_dkv=fq(bs.block_q_dkv), block_k_dkv=fk(bs.block_k_dkv),
                             block_q_dq=fq(bs.block_q_dq), block_k_dq=fk(bs.block_k_dq))


def flash_attention(q, k, v, *, causal, segment_ids=None, softmax_scale=None, mask=None, target=None,
                    interpret=None, block_sizes=None):
  """Flash attention with kernels.attention's contract (see there); Pallas forward and backward.

  q: (b, T, h, d); k, v: (b, S, hk, d), h % hk == 0. segment_ids: (b, T) or (q_ids, kv_ids).
  target: "gpu" (Triton) or "tpu" (Mosaic); default from jax.default_backend(), and "gpu" kernels
    (interpreted) on a backend that has neither.
  interpret: run in Pallas interpret mode; default True exactly when the backend is not `target`'s.
  block_sizes: a BlockSizes (taken as given, except clamped to the lengths); default from _BLOCKS.
  """
  if mask is not None:
    raise NotImplementedError("flash_attention (impl='pallas') does not support a dense `mask`; "
                              "use impl='xla' or 'reference' (impl='auto' falls back to xla for it)")
  backend = jax.default_backend()
  target = target or backend_target(backend) or "gpu"
  if target not in TARGETS:
    raise ValueError(f"flash_attention: target={target!r} is not one of {TARGETS}")
  if interpret is None:
    interpret = backend != target
  b, t, h, d = q.shape
  s = k.shape[1]
  if d > MAX_HEAD_DIM:
    raise NotImplementedError(f"flash_attention: head_dim {d} > {MAX_HEAD_DIM}")
  if causal and t != s:
    raise ValueError(f"flash_attention: causal needs equal q and kv lengths; got {t} and {s}")
  scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)

  bs = _fit_blocks(block_sizes or default_block_sizes(target, d), target, t, s)
  tp = round_up(t, max(bs.block_q, bs.block_q_dkv, bs.block_q_dq))
  sp = round_up(s, max(bs.block_k, bs.block_k_dkv, bs.block_k_dq))
  c = _Cfg(target=target, causal=bool(causal), scale=scale, q_len=t, kv_len=s,
           has_seg=segment_ids is not None, blocks=bs, interpret=interpret,
           empty_rows=isinstance(segment_ids, tuple))
  # Triton tiles must have power-of-two sizes: zero-pad head_dim (q.k and the output's real
  # columns are unchanged; the scale was fixed above from the real d).
  dp = max(16, pow2_at_least(d)) if target == "gpu" else d
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))
  q, k, v = pad(q, tp), pad(k, sp), pad(v, sp)

  q_ids = kv_ids = None
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    # Pad ids are arbitrary: pad query rows are discarded, pad keys masked by position.
    q_ids = jnp.pad(q_ids.astype(jnp.int32), ((0, 0), (0, tp - t)))
    kv_ids = jnp.pad(kv_ids.astype(jnp.int32), ((0, 0), (0, sp - s)))

  kernels = _BACKENDS[target]
  out = kernels.from_kernel(_flash(*kernels.to_kernel(q, k, v, q_ids, kv_ids), c))
  return out[:, :t, :, :d]
