"""Multi-head attention with grouped KV heads: one public op, a plain reference and an XLA path.

Layout is (batch, length, heads, head_dim) for q, k and v; k and v may carry fewer heads than q
(grouped-query attention) as long as they divide it. Masking uses a large finite negative value,
so a row with no visible key gives a uniform average instead of NaN.

Implementations (``impl=``):

* ``"reference"``: plain float32 einsums over the full (T, S) score matrix; the ground truth.
* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` with a boolean mask.
* ``"pallas"``: flash attention kernels (kernels/flash_attention*.py): Triton on GPU, Mosaic on TPU,
  forward and backward, O(L) memory. On a CPU backend they run in Pallas interpret mode (for tests;
  slow). No dense ``mask`` (NotImplementedError). Tile sizes come from the tuning table
  (kernels/tuning.py, written by ``altbench bench kernels --tune``) for this device kind, else from the
  hand-set table ``_BLOCKS`` there, one entry per (backend, head_dim class 64/128/256).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (cuDNN's fused flash
  attention), where cuDNN takes the call: a CUDA GPU, 16-bit q/k/v of one dtype, head_dim a multiple
  of 8 and <= 128 (<= 256 from Hopper, compute capability 9.0), no dense ``mask`` and no
  ``segment_ids`` (jax's public API has no segment ids; a packed-document mask would have to go in as
  a dense mask or bias). Anything else is a ValueError saying why (``cudnn_unsupported``).
* ``"auto"``: on a GPU/TPU a fused kernel when it supports the call (no dense mask, head_dim <= 256; on
  GPU 16-bit inputs, see ``tuning.pallas_dtype_pays``) and the query is at least
  ``AUTO_PALLAS_MIN_Q_LEN`` long (single-token decode steps are a matrix-vector product that a flash
  tile would mostly pad), otherwise ``"xla"``; always ``"xla"`` on CPU. The fused kernel is
  ``"pallas"``, except on a GPU whose tuning-table entry ``attention_gpu_impl`` for this head_dim class
  says ``{"impl": "cudnn"}`` (written by ``altbench bench kernels --tune``, which times both) and
  cuDNN takes the call. With several devices it needs a mesh in context (below); without one it stays
  ``"xla"`` (GSPMD would replicate a bare pallas_call onto every device).
  The environment variable ALTBENCH_ATTENTION_AUTO=xla (or =pallas) overrides the choice.

Under a mesh. With a multi-device mesh in context (``jax.set_mesh(mesh)`` around the trace; kernels read
``jax.sharding.get_abstract_mesh()``), "pallas" and "cudnn" run inside ``jax.shard_map`` over the batch
axes ("data", "fsdp"), each device on its slice of the batch with q, k, v, segment ids split as
P(batch axes) and the output likewise (``pallas_common.shard_batch``). A batch axis whose size does not
divide the batch (after the ones kept) is left out: its devices compute their slice redundantly, which is
correct but not faster. Heads are not split over a tensor-parallel axis (the meshes here have none):
devices along any non-batch axis get whole heads. Without a mesh, or on one device, the kernel is called
directly.
"""

import jax
import jax.numpy as jnp
from einops import einsum, rearrange

from altbench.kernels import flash_attention as _flash
from altbench.kernels import pallas_common, tuning

IMPLS = ("auto", "reference", "xla", "pallas", "cudnn")
AUTO_PALLAS_MIN_Q_LEN = 16
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _check(q, k, v, causal, segment_ids, impl):
  if impl not in IMPLS:
    raise ValueError(f"attention: impl={impl!r} is not one of {IMPLS}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention: q, k, v must be (b, l, h, d); got {q.shape}, {k.shape}, {v.shape}")
  if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
    raise ValueError(f"attention: k {k.shape} and v {v.shape} must match q {q.shape} in batch and head_dim")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"attention: q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"attention: causal=True needs equal q and kv lengths; got {q.shape[1]} and {k.shape[1]}"
                     " (mask a KV cache with segment_ids=(q_ids, kv_ids) instead)")
  if segment_ids is not None and not isinstance(segment_ids, tuple) and q.shape[1] != k.shape[1]:
    raise ValueError("attention: a single segment_ids array needs equal q and kv lengths; pass (q_ids, kv_ids)")


def _mask_BTS(q_len, kv_len, causal, segment_ids, extra=None):
  """Boolean visibility mask (b or 1, T, S), or None when everything is visible."""
  mask = None if extra is None else jnp.broadcast_to(extra, (extra.shape[0] if extra.ndim == 3 else 1, q_len, kv_len))
  if causal and mask is not None:
    mask = mask & jnp.tril(jnp.ones((q_len, kv_len), bool))[None]
  elif causal:
    mask = jnp.tril(jnp.ones((q_len, kv_len), bool))[None]
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    seg = q_ids[:, :, None] == kv_ids[:, None, :]
    mask = seg if mask is None else mask & seg
  return mask


def _reference(q, k, v, causal, segment_ids, scale, extra):
  groups = q.shape[2] // k.shape[2]
  q_BTKGD = rearrange(q.astype(jnp.float32), "b t (k g) d -> b t k g d", g=groups)
  logits_BKGTS = einsum(q_BTKGD, k.astype(jnp.float32), "b t k g d, b s k d -> b k g t s") * scale
  mask = _mask_BTS(q.shape[1], k.shape[1], causal, segment_ids, extra)
  if mask is not None:
    logits_BKGTS = jnp.where(mask[:, None, None], logits_BKGTS, _MASK_VALUE)
  probs = jax.nn.softmax(logits_BKGTS, axis=-1)
  out = einsum(probs, v.astype(jnp.float32), "b k g t s, b s k d -> b t k g d")
  return rearrange(out, "b t k g d -> b t (k g) d").astype(q.dtype)


CAUSAL_BLOCK = 64  # query block of the causal XLA path, unless the tuning table has one for this device
# The blocks are an unrolled Python loop: compile time grows with their number, the work skipped hardly
# ((n + 1) / 2n of the scores remain: 53% at 16 blocks, 51% at 64). Longer sequences get longer blocks.
MAX_CAUSAL_BLOCKS = 16


def causal_block(head_dim):
  tuned = tuning.lookup("attention_xla", f"d{_flash.head_dim_class(min(head_dim, _flash.MAX_HEAD_DIM))}")
  return int(tuned["causal_block"]) if tuned else CAUSAL_BLOCK


def _xla_causal_blocked(q, k, v, segment_ids, scale, block):
  """Causal self-attention in query blocks: block i sees keys [0, (i + 1) * block) only.

  Works in (b, kv_heads, groups, t, d) layout so XLA never transposes the (t, s) probabilities, scales q
  rather than the scores, and skips the blocks above the diagonal (about (n + 1) / 2n of the score work).
  """
  t, groups = q.shape[1], q.shape[2] // k.shape[2]
  q_ids, kv_ids = ((segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids))
                   if segment_ids is not None else (None, None))
  q_BKGTD = rearrange(q * jnp.asarray(scale, q.dtype), "b t (k g) d -> b k g t d", g=groups)
  k_BKSD, v_BKSD = rearrange(k, "b s k d -> b k s d"), rearrange(v, "b s k d -> b k s d")
  outs = []
  for lo in range(0, t, block):
    hi = lo + block
    logits = jnp.einsum("bkgtd,bksd->bkgts", q_BKGTD[:, :, :, lo:hi], k_BKSD[:, :, :hi],
                        preferred_element_type=jnp.float32)
    mask_BTS = (jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None])[None]
    if q_ids is not None:
      mask_BTS = mask_BTS & (q_ids[:, lo:hi, None] == kv_ids[:, None, :hi])
    probs = jax.nn.softmax(jnp.where(mask_BTS[:, None, None], logits, _MASK_VALUE), axis=-1)
    outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v_BKSD[:, :, :hi]))
  return rearrange(jnp.concatenate(outs, axis=3), "b k g t d -> b t (k g) d")


def _xla(q, k, v, causal, segment_ids, scale, extra):
  t, block = q.shape[1], causal_block(q.shape[-1])
  if causal and extra is None and t == k.shape[1] and t % block == 0 and t >= 2 * block:
    n = t // block
    merge = next(f for f in range(1, n + 1) if n % f == 0 and n // f <= MAX_CAUSAL_BLOCKS)
    return _xla_causal_blocked(q, k, v, segment_ids, scale, block * merge)
  mask = _mask_BTS(q.shape[1], k.shape[1], causal, segment_ids, extra)
  return jax.nn.dot_product_attention(
      q, k, v, mask=None if mask is None else mask[:, None], scale=scale, implementation="xla")


def attention(q, k, v, *, causal, segment_ids=None, softmax_scale=None, mask=None, impl="auto"):
  """softmax(q k^T * scale + mask) v with grouped KV heads.

  q: (b, T, h, d); k, v: (b, S, hk, d) with h % hk == 0.
  causal: query i sees keys j <= i (needs T == S).
  segment_ids: (b, T) ints (tokens see only their own segment), or a pair (q_ids (b, T), kv_ids (b, S))
    e.g. to mask the unwritten slots of a KV cache.
  softmax_scale: defaults to d ** -0.5.
  mask: optional boolean (T, S) or (b, T, S), True where a query may see a key, combined with the above
    (e.g. block diffusion's block-causal two-halves mask).
  impl: "reference" (plain f32 einsums), "xla" (jax.nn.dot_product_attention), "pallas" (flash
    attention kernels; interpreted on CPU), "cudnn" (cuDNN's fused attention; GPU, 16-bit, no mask or
    segment ids), "auto" (a fused kernel on GPU/TPU where supported, else xla; module docstring).
  """
  _check(q, k, v, causal, segment_ids, impl)
  scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
  if impl == "auto":
    impl = _auto_impl(q.shape, k.shape, mask, q.dtype, segment_ids is not None)
  if impl == "reference":
    return _reference(q, k, v, causal, segment_ids, scale, mask)
  if impl == "cudnn":
    dtype = jnp.result_type(q, k, v)
    reason = cudnn_unsupported(q.shape, k.shape, dtype, mask=mask, has_segment_ids=segment_ids is not None)
    if reason:
      raise ValueError(f"attention: impl='cudnn' cannot run this call: {reason}. Valid here: impl='pallas' "
                       f"(flash kernels), 'xla', 'reference', or 'auto' (picks one)")
    kernel = lambda q, k, v: jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                                          scale=scale, is_causal=causal, implementation="cudnn")
    return pallas_common.shard_batch(kernel, (q, k, v), (True,) * 3)
  if impl == "pallas":
    if mask is not None:  # before shard_map, so that the error names the call, not a per-device trace
      return _flash.flash_attention(q, k, v, causal=causal, mask=mask)
    q_ids, kv_ids = ((segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids))
                     if segment_ids is not None else (None, None))

    def kernel(q, k, v, q_ids, kv_ids):
      ids = None if q_ids is None else (q_ids, kv_ids)
      return _flash.flash_attention(q, k, v, causal=causal, segment_ids=ids, softmax_scale=scale)

    return pallas_common.shard_batch(kernel, (q, k, v, q_ids, kv_ids), (True,) * 5)
  return _xla(q, k, v, causal, segment_ids, scale, mask)


CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def cudnn_max_head_dim(device=None):
  """cuDNN's fused attention head_dim limit on this GPU: 256 from Hopper (compute capability 9.0), else 128."""
  device = device or jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if capability is None:
    return 128
  return 256 if tuple(int(x) for x in str(capability).split(".")[:2]) >= (9, 0) else 128


def cudnn_unsupported(q_shape, k_shape, dtype, *, mask=None, has_segment_ids=False, backend=None,
                      max_head_dim=None):
  """Why impl="cudnn" cannot run this call ("" when it can): the limits of jax.nn.dot_product_attention's
  cuDNN path as of jax 0.10, checked here so that the error names the call rather than a lowering."""
  backend = backend or jax.default_backend()
  if backend != "gpu":
    return f"cuDNN attention needs a CUDA GPU, and the jax backend here is {backend!r}"
  if jnp.dtype(dtype) not in CUDNN_DTYPES:
    return f"dtype {jnp.dtype(dtype).name}: cuDNN attention takes bfloat16 or float16 q, k, v"
  d, limit = q_shape[-1], max_head_dim or cudnn_max_head_dim()
  if d % 8 or d > limit:
    return f"head_dim {d}: cuDNN attention takes a multiple of 8 up to {limit} on this GPU"
  if mask is not None:
    return "a dense mask: not passed to cuDNN (it would materialise the (T, S) mask)"
  if has_segment_ids:
    return "segment_ids: jax.nn.dot_product_attention has no segment ids"
  return ""


def _auto_impl(q_shape, k_shape, mask, dtype, has_segment_ids=False, target=None):
  """What impl="auto" runs (module docstring). target: "gpu" / "tpu" / None (CPU); default from the backend."""
  forced = tuning.forced_impl("ALTBENCH_ATTENTION_AUTO", ("xla", "pallas", "reference", "cudnn"))
  if forced:
    return forced
  target = _flash.backend_target() if target is None else target
  if (target is None or not pallas_common.sharded_ok() or q_shape[1] < AUTO_PALLAS_MIN_Q_LEN
      or not _flash.supported(q_shape, k_shape, mask=mask) or not tuning.pallas_dtype_pays(target, dtype)):
    return "xla"
  if target == "gpu" and gpu_impl(q_shape[-1]) == "cudnn" and not cudnn_unsupported(
      q_shape, k_shape, dtype, mask=mask, has_segment_ids=has_segment_ids, backend="gpu"):
    return "cudnn"
  return "pallas"


GPU_IMPL_OP = "attention_gpu_impl"  # tuning-table op: {"impl": "cudnn" | "pallas"} per head_dim class


def gpu_impl(head_dim):
  """The fused attention kernel the tuning table picks for this GPU and head_dim class ("pallas" without an
  entry)."""
  tuned = tuning.lookup(GPU_IMPL_OP, f"d{_flash.head_dim_class(min(head_dim, _flash.MAX_HEAD_DIM))}")
  impl = (tuned or {}).get("impl", "pallas")
  if impl not in ("cudnn", "pallas"):
    raise ValueError(f"tuning table {tuning.table_path()}: {GPU_IMPL_OP} entry {tuned}: impl must be "
                     f"'cudnn' or 'pallas'")
  return impl
