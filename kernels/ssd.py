"""Mamba-2 state-space-duality (SSD) scan.

This is the sequence-mixing core of a Mamba-2 layer: a selective linear
recurrence over time, per batch element and head,

  h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        (state h: (p, n))
  y_t = h_t C_t + D * x_t,        then  y_t * silu(z_t)  if z is given,

with the argument layout of mamba_ssm's ``mamba_chunk_scan_combined`` so that
weights and call sites port over unchanged. ``ssd`` is the single entry point;
``impl`` picks the algorithm:

* ``"reference"``: the recurrence above, one ``lax.scan`` step per token. Slow,
  but simple enough to be trusted; the other paths are tested against it.
* ``"xla"``: the chunked SSD algorithm of the Mamba-2 paper. Inside each chunk
  the recurrence is unrolled into a masked, attention-like quadratic form
  (matmuls, which is what accelerators are good at); only one state per chunk is
  carried across chunks, so work is linear in the length. On CPU the chunks are
  processed a few at a time (a scan over cache-sized blocks of chunks), so that
  time stays linear in the length too.
* ``"pallas"``: the chunked algorithm as Pallas kernels with a hand-written
  backward (kernels/ssd_pallas*.py): Triton on GPU, Mosaic on TPU. On a CPU
  backend they run in Pallas interpret mode (for tests; slow). Matmul operands
  stay in the input dtype (bf16 in, float32 accumulation), so for bf16 inputs
  it is not bit-for-bit the float32 math of the other paths.
* ``"auto"``: ``"pallas"`` on a GPU or TPU when ``ssd_pallas.supported`` accepts the call,
  the sequence is at least ``AUTO_PALLAS_MIN_LEN`` long and, on GPU, the inputs are 16-bit
  (``tuning.pallas_dtype_pays``); otherwise ``"xla"``; always ``"xla"`` on CPU. Measured on an H100
  (jax 0.11.2, bf16): the kernels alone 2.0-2.3x faster than XLA fwd+bwd (b8 h32 p64 n128 at 4K and 8K;
  b1 h24 with seq_idx at 4K), a 124M hybrid's train step at b1 x 4K 1.77x faster (25.7 vs 45.6 ms).
  (An earlier reading, 7x slower end to end, came from the Mamba-2 block handing the scan float32
  x, B, C.) With several devices it needs a mesh in context (below); without one it stays ``"xla"``
  (GSPMD cannot partition a pallas_call: it would replicate it onto every device).
  The environment variable ALTBENCH_SSD_AUTO=xla (or =pallas, =reference) overrides the choice.

Under a mesh. With a multi-device mesh in context (``jax.set_mesh(mesh)`` around the trace; the kernels
read ``jax.sharding.get_abstract_mesh()``), ``"pallas"`` runs inside ``jax.shard_map`` over the batch
axes ("data", "fsdp") (``pallas_common.shard_batch``): x, dt, B, C, z, initial_states and seq_idx split
as P(batch axes), A, D and dt_bias replicated (their gradients summed over devices), y and final_states
split as P(batch axes). A batch axis whose size does not divide the batch (after the ones kept) is left
out: its devices compute their slice redundantly, correct but not faster. Heads are not split over a
tensor-parallel axis. Without a mesh, or on one device, the kernels are called directly.

Packed documents (``seq_idx``). The state is reset to zero wherever ``seq_idx``
changes between consecutive positions, so no information flows between
documents. ``initial_states`` seeds only the leading document (the positions
before the first change), and ``final_states`` is the state at the last
position, i.e. of the last document. mamba_ssm instead compares against
``seq_idx == 0`` (its initial states only reach positions whose seq_idx is 0,
at chunk granularity); for its convention of non-decreasing ids starting at 0
the two agree. Reset-on-change was chosen because it does not depend on the
numbering (ids need not start at 0 or increase) and is exact at token, not
chunk, granularity.

Contract on values: ``A`` negative and the processed ``dt`` non-negative, so
every decay factor is in (0, 1]. The chunked path clamps decay exponents at 0
to stay finite in any case; outside the contract it then differs from the
reference.

All arithmetic is float32 whatever the input dtype; ``y`` is returned in
``x``'s dtype and ``final_states`` in float32. Gradients come from autodiff and
are kept finite for extreme inputs (huge ``dt``, ``|A|``, long sequences) by
never evaluating an ``exp`` that could overflow, even in a branch that a
``where`` later discards.
"""

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from einops import einsum, rearrange

from altbench.kernels import tuning

IMPLS = ("auto", "reference", "xla", "pallas")
# impl="auto" leaves short calls (decode-like) to XLA: a Pallas launch would mostly pad one chunk.
AUTO_PALLAS_MIN_LEN = 16
AUTO_PALLAS_TARGETS = ("gpu", "tpu")

# Same threshold as torch.nn.functional.softplus / mamba_ssm: above it,
# softplus(x) == x to float32 precision.
_SOFTPLUS_THRESHOLD = 20.0

# Working-set budget for one block of chunks on CPU: one float32 (chunk x chunk) matrix per
# batch element, head and chunk of the block. 512 KiB keeps the few such live tensors within a
# 2 MiB per-core L2; the speed is flat within about 2x of it either way.
_CPU_BLOCK_BYTES = 512 * 1024


def _softplus(x):
  # The inner minimum keeps exp finite in the branch that where() discards:
  # otherwise its gradient is inf/inf = NaN, and NaN * 0 is still NaN.
  safe = jnp.minimum(x, _SOFTPLUS_THRESHOLD)
  return jnp.where(x > _SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(safe)))


def _shape_error(name, got, expected):
  return ValueError(f"ssd: {name} has shape {tuple(got)}, expected {expected}")


def _check_shapes(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx):
  if x.ndim != 4:
    raise _shape_error("x", x.shape, "(batch, seqlen, nheads, headdim)")
  b, l, h, p = x.shape
  if dt.shape != (b, l, h):
    raise _shape_error("dt", dt.shape, f"(batch, seqlen, nheads) = {(b, l, h)}")
  if A.shape != (h,):
    raise _shape_error("A", A.shape, f"(nheads,) = {(h,)}")
  if B.ndim != 4 or B.shape[:2] != (b, l):
    raise _shape_error("B", B.shape, f"(batch, seqlen, ngroups, dstate) with batch, seqlen = {(b, l)}")
  g, n = B.shape[2:]
  if g == 0 or h % g != 0:
    raise ValueError(f"ssd: nheads={h} (x.shape[2]) must be divisible by ngroups={g} (B.shape[2])")
  if C.shape != B.shape:
    raise _shape_error("C", C.shape, f"the shape of B, {tuple(B.shape)}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
  if D is not None and D.shape not in ((h,), (h, p)):
    raise _shape_error("D", D.shape, f"(nheads,) = {(h,)} or (nheads, headdim) = {(h, p)}")
  if z is not None and z.shape != x.shape:
    raise _shape_error("z", z.shape, f"the shape of x, {tuple(x.shape)}")
  if dt_bias is not None and dt_bias.shape != (h,):
    raise _shape_error("dt_bias", dt_bias.shape, f"(nheads,) = {(h,)}")
  if initial_states is not None and initial_states.shape != (b, h, p, n):
    raise _shape_error("initial_states", initial_states.shape,
                       f"(batch, nheads, headdim, dstate) = {(b, h, p, n)}")
  if seq_idx is not None:
    if seq_idx.shape != (b, l):
      raise _shape_error("seq_idx", seq_idx.shape, f"(batch, seqlen) = {(b, l)}")
    if not jnp.issubdtype(seq_idx.dtype, jnp.integer):
      raise ValueError(f"ssd: seq_idx must have an integer dtype, got {seq_idx.dtype}")


def _document_ids(seq_idx):
  """Renumber seq_idx as 0, 1, 2, ... counting changes between neighbours.

  Both paths then only need "same id" tests, and ids are non-decreasing, so
  two positions with equal ids have no document start between them.
  """
  return jnp.cumsum(_starts(seq_idx), axis=1, dtype=jnp.int32)


def _starts(ids_BL):
  """True where a position's id differs from the previous position's (never at position 0)."""
  return ids_BL != jnp.concatenate([ids_BL[:, :1], ids_BL[:, :-1]], axis=1)


def ssd(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
        dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, impl="auto"):
  """Mamba-2 SSD scan (see the module docstring for the recurrence).

  Args:
    x: (batch, seqlen, nheads, headdim) input.
    dt: (batch, seqlen, nheads) raw step sizes, before ``dt_bias``/softplus.
    A: (nheads,) negative decay rates.
    B, C: (batch, seqlen, ngroups, dstate); head i uses group i // (nheads // ngroups).
    chunk_size: chunk length of the chunked algorithm (any seqlen is fine).
    D: optional (nheads,) or (nheads, headdim) skip connection.
    z: optional (batch, seqlen, nheads, headdim) gate: y * silu(z).
    dt_bias: optional (nheads,) added to dt before the softplus.
    initial_states: optional (batch, nheads, headdim, dstate) state before position 0.
    seq_idx: optional (batch, seqlen) int document ids; the state is reset where it changes.
    dt_softplus: apply softplus (threshold 20) to dt + dt_bias.
    dt_limit: (lo, hi) clamp of dt after the softplus.
    return_final_states: also return the state after the last position.
    impl: "auto", "reference", "xla" or "pallas" (see the module docstring).

  Returns:
    y (batch, seqlen, nheads, headdim) in x's dtype, or (y, final_states) with
    final_states (batch, nheads, headdim, dstate) float32.
  """
  if impl not in IMPLS:
    raise ValueError(f"ssd: unknown impl {impl!r}; valid choices are {IMPLS}")
  _check_shapes(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx)
  if impl == "auto":
    impl = _auto_impl(x.shape, B.shape, x.dtype)
  if impl == "pallas":
    from altbench.kernels import pallas_common, ssd_pallas  # imported here: ssd_pallas imports this module

    def kernel(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx):
      return ssd_pallas.ssd_pallas(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                   initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                                   dt_limit=dt_limit, return_final_states=return_final_states)

    # Split over the batch: x, dt, B, C, z, initial_states, seq_idx; replicated: A, D, dt_bias.
    batched = (True, True, False, True, True, False, True, False, True, True)
    return pallas_common.shard_batch(kernel, (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx), batched)
  return _ssd(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size=int(chunk_size),
              dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), return_final_states=return_final_states,
              impl=impl)


def _auto_impl(x_shape, B_shape, dtype):
  """What impl="auto" runs: pallas on a GPU or TPU (one, or several under a mesh in context) where supported
  and worth it, else xla (module docstring)."""
  forced = tuning.forced_impl("ALTBENCH_SSD_AUTO")
  if forced:
    return forced
  from altbench.kernels import pallas_common, ssd_pallas
  target = ssd_pallas.backend_target()
  if (target in AUTO_PALLAS_TARGETS and pallas_common.sharded_ok() and x_shape[1] >= AUTO_PALLAS_MIN_LEN
      and ssd_pallas.supported(x_shape, B_shape, dtype) and tuning.pallas_dtype_pays(target, dtype)):
    return "pallas"
  return "xla"


def _process_dt(dt, dt_bias, dt_softplus, dt_limit):
  """dt as the recurrence uses it (float32): + dt_bias, softplus, clamp to dt_limit. Shared by all impls."""
  f32 = jnp.float32
  dt_BLH = dt.astype(f32)
  if dt_bias is not None:
    dt_BLH = dt_BLH + dt_bias.astype(f32)
  if dt_softplus:
    dt_BLH = _softplus(dt_BLH)
  # Skipped at the default so that the clip cannot halve gradients at dt == 0.
  if tuple(dt_limit) != (0.0, float("inf")):
    dt_BLH = jnp.clip(dt_BLH, dt_limit[0], dt_limit[1])
  return dt_BLH


@functools.partial(
    jax.jit, static_argnames=("chunk_size", "dt_softplus", "dt_limit", "return_final_states", "impl"))
def _ssd(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, *, chunk_size, dt_softplus, dt_limit,
         return_final_states, impl):
  """ssd after validation: dt preprocessing, the chosen path, then the D skip and z gate."""
  f32 = jnp.float32
  x_BLHP = x.astype(f32)
  dt_BLH = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
  A_H = A.astype(f32)
  B_BLGN = B.astype(f32)
  C_BLGN = C.astype(f32)
  b, _, h, p = x.shape
  n = B.shape[-1]
  h0_BHPN = jnp.zeros((b, h, p, n), f32) if initial_states is None else initial_states.astype(f32)
  doc_BL = None if seq_idx is None else _document_ids(seq_idx)

  if impl == "reference":
    y_BLHP, final_BHPN = _ssd_reference(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, h0_BHPN, doc_BL)
  else:
    y_BLHP, final_BHPN = _ssd_xla(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, h0_BHPN, doc_BL, chunk_size)

  if D is not None:
    D_HP = jnp.broadcast_to(D.astype(f32).reshape(h, -1), (h, p))
    y_BLHP = y_BLHP + einsum(x_BLHP, D_HP, "b l h p, h p -> b l h p")
  if z is not None:
    y_BLHP = y_BLHP * jax.nn.silu(z.astype(f32))
  y = y_BLHP.astype(x.dtype)
  return (y, final_BHPN) if return_final_states else y


def _ssd_reference(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, h0_BHPN, doc_BL):
  """Token-by-token recurrence; the ground truth for the other paths."""
  b, l, h, p = x_BLHP.shape
  g = B_BLGN.shape[2]
  B_BLHN = jnp.repeat(B_BLGN, h // g, axis=2)
  C_BLHN = jnp.repeat(C_BLGN, h // g, axis=2)
  decay_BLH = jnp.exp(dt_BLH * A_H)
  if doc_BL is None:
    reset_BL = jnp.zeros((b, l), bool)
  else:
    reset_BL = _starts(doc_BL)

  def step(h_BHPN, inputs):
    x_BHP, dt_BH, decay_BH, B_BHN, C_BHN, reset_B = inputs
    h_BHPN = jnp.where(reset_B[:, None, None, None], 0.0, h_BHPN)
    h_BHPN = (decay_BH[:, :, None, None] * h_BHPN
              + einsum(dt_BH[:, :, None] * x_BHP, B_BHN, "b h p, b h n -> b h p n"))
    return h_BHPN, einsum(h_BHPN, C_BHN, "b h p n, b h n -> b h p")

  time_major = [jnp.moveaxis(a, 1, 0) for a in (x_BLHP, dt_BLH, decay_BLH, B_BLHN, C_BLHN, reset_BL)]
  final_BHPN, y_LBHP = jax.lax.scan(step, h0_BHPN, time_major)
  return jnp.moveaxis(y_LBHP, 0, 1), final_BHPN


def cpu_block_bytes(headdim, dstate):
  tuned = tuning.lookup("ssd_xla", tuning.ssd_class(headdim, dstate))
  return int(tuned["cpu_block_bytes"]) if tuned else _CPU_BLOCK_BYTES


def _chunks_per_block(b, h, q, nchunks, p, n):
  """How many chunks the XLA path processes at once."""
  if jax.default_backend() != "cpu":
    return nchunks  # accelerators want every chunk in flight at once
  # On CPU, blocks small enough that their (chunk x chunk) tensors stay in cache: run over the
  # whole sequence at once they stream through memory, and time grows faster than the length.
  return max(1, min(nchunks, cpu_block_bytes(p, n) // (b * h * q * q * 4)))


def _ssd_xla(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, h0_BHPN, doc_BL, chunk_size):
  """The chunked algorithm, run over the sequence in blocks of chunks carrying the state."""
  b, l, h, p = x_BLHP.shape
  q = chunk_size
  nchunks = max(1, math.ceil(l / q))
  nblocks = math.ceil(nchunks / _chunks_per_block(b, h, q, nchunks, p, B_BLGN.shape[-1]))
  if nblocks == 1:
    return _ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, h0_BHPN, doc_BL, q)

  def block(state_BHPN, xs, doc, doc_enter):
    x, dt, B, C = xs
    y, state_BHPN = _ssd_chunked(x, dt, A_H, B, C, state_BHPN, doc, q, doc_enter)
    return state_BHPN, y

  # dt = 0 pads are identity steps
  return scan_blocks(block, h0_BHPN, (x_BLHP, dt_BLH, B_BLGN, C_BLGN), doc_BL, nchunks, nblocks, q)


def scan_blocks(block, state0, arrays, doc_BL, nchunks, nblocks, chunk):
  """A chunked scan run over the sequence in nblocks equal blocks of chunks, carrying the state (the XLA paths
  of ssd and gated_delta on CPU). arrays (b, l, ...) are zero-padded at the end (padding stays under one chunk
  per block: the caller makes zero pads identity steps) and cut into blocks; block(state, arrays of one block,
  doc_BT or None, doc_enter_B or None) -> (state, out_BT...), where doc_enter is the document the block is
  entered in (the one that ended the previous block). Returns (out (b, l, ...), final state).

  Each block is rematerialised: the backward pass keeps only the states between blocks, not every block's
  (chunk x chunk) intermediates; recomputing a block's forward is no slower on CPU than storing them.
  """
  l = arrays[0].shape[1]
  block_len = math.ceil(nchunks / nblocks) * chunk
  pad = nblocks * block_len - l
  zero_pad = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  to_blocks = lambda a: rearrange(a, "b (s t) ... -> s b t ...", t=block_len)
  xs = [to_blocks(zero_pad(a)) for a in arrays]
  if doc_BL is None:
    docs = (None, None)
  else:
    doc_SBT = to_blocks(jnp.pad(doc_BL, ((0, 0), (0, pad)), mode="edge"))
    docs = (doc_SBT, jnp.concatenate([doc_SBT[:1, :, 0], doc_SBT[:-1, :, -1]], axis=0))

  @jax.checkpoint
  def step(state, inputs):
    return block(state, inputs[:-2], *inputs[-2:])

  final, out_SBT = jax.lax.scan(step, state0, (*xs, *docs))
  return rearrange(out_SBT, "s b t ... -> b (s t) ...")[:, :l], final


def _segsum(dA_Q):
  """segsum[..., i, j] = sum of dA over (j, i] for i >= j, and 0 for i < j.

  Summing the masked terms directly instead of differencing a running
  cumsum avoids cancellation: cumsum(dA)[i] - cumsum(dA)[j] loses all
  precision in a small difference of two large sums (a long, strongly
  decaying chunk), which would show up as error in exp(segsum) ~ 1.
  The sum is a matmul with a lower-triangular matrix of ones: on CPU that
  is ~4x cheaper than a cumsum over (chunk x chunk) (forward + backward),
  which took a quarter of the whole op. HIGHEST keeps accelerators from
  rounding the terms to tf32/bf16 on the way into the matmul.
  """
  q = dA_Q.shape[-1]
  below_diag_QQ = jnp.tril(jnp.ones((q, q), bool), k=-1)
  terms_QQ = jnp.where(below_diag_QQ, dA_Q[..., :, None], 0.0)
  ones_QQ = jnp.tril(jnp.ones((q, q), dA_Q.dtype))
  return jnp.einsum("ik,...kj->...ij", ones_QQ, terms_QQ, precision=jax.lax.Precision.HIGHEST)


def _ssd_chunked(x_BLHP, dt_BLH, A_H, B_BLGN, C_BLGN, h0_BHPN, doc_BL, chunk_size, doc_enter_B=None):
  """Chunked SSD over a whole span: quadratic within chunks, a recurrence over chunk states.

  h0 is the state entering the span; doc_enter_B the document it belongs to (by default the
  span's first document, i.e. initial_states seed the leading document).
  """
  b, l, h, p = x_BLHP.shape
  g = B_BLGN.shape[2]
  q = chunk_size
  nchunks = max(1, math.ceil(l / q))
  pad = nchunks * q - l
  if pad:
    # dt = 0 makes a padded step the identity (decay 1, no input), so the
    # final state is untouched; the padded outputs are sliced off below.
    zero_pad = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    x_BLHP, dt_BLH, B_BLGN, C_BLGN = map(zero_pad, (x_BLHP, dt_BLH, B_BLGN, C_BLGN))
    if doc_BL is not None:
      # Padding continues the last document, so it cannot cut the final state off.
      doc_BL = jnp.pad(doc_BL, ((0, 0), (0, pad)), mode="edge" if l else "constant")

  # Layout: (batch, chunk, group, head-in-group, ...) leading, so every matmul
  # below is a plain batched matmul over those axes with no transposes of the
  # big (chunk x chunk) tensors. Heads are split as (group, head-in-group) so
  # B and C are shared, never repeated per head.
  x_BCGRQP = rearrange(x_BLHP, "b (c q) (g r) p -> b c g r q p", q=q, g=g)
  dt_BCGRQ = rearrange(dt_BLH, "b (c q) (g r) -> b c g r q", q=q, g=g)
  A_GR = rearrange(A_H, "(g r) -> g r", g=g)
  B_BCGQN = rearrange(B_BLGN, "b (c q) g n -> b c g q n", q=q)
  C_BCGQN = rearrange(C_BLGN, "b (c q) g n -> b c g q n", q=q)
  # Broadcasting products are written as einsums throughout: their transposes
  # are then matmuls too. As plain `a * b[..., None]`, the backward pass gets
  # multiply+reduce fusions, which XLA:CPU (YNNPACK fusions, jax 0.10) runs
  # ~50x slower whenever the tensor has a size-1 axis (ngroups=1, batch=1).
  dA_BCGRQ = einsum(dt_BCGRQ, A_GR, "b c g r q, g r -> b c g r q")
  dtx_BCGRQP = einsum(dt_BCGRQ, x_BCGRQP, "b c g r q, b c g r q p -> b c g r q p")

  causal_QQ = jnp.tril(jnp.ones((q, q), bool))
  if doc_BL is None:
    keep_BCGRQQ = causal_QQ
  else:
    doc_BCQ = rearrange(doc_BL, "b (c q) -> b c q", q=q)
    same_doc_BCQQ = doc_BCQ[:, :, :, None] == doc_BCQ[:, :, None, :]
    keep_BCGRQQ = (causal_QQ & same_doc_BCQQ)[:, :, None, None]
  # Clamp, then mask: exp sees only finite exponents <= 0, so neither it nor
  # its gradient can overflow, and masked entries get a zero cotangent.
  L_BCGRQQ = jnp.where(keep_BCGRQQ, jnp.exp(jnp.minimum(_segsum(dA_BCGRQ), 0.0)), 0.0)

  # 1. Within each chunk: y_i = sum_{j <= i} (C_i . B_j) L_ij dt_j x_j.
  CB_BCGQQ = einsum(C_BCGQN, B_BCGQN, "b c g i n, b c g j n -> b c g i j")
  M_BCGRQQ = einsum(CB_BCGQQ, L_BCGRQQ, "b c g i j, b c g r i j -> b c g r i j")
  y_BCGRQP = einsum(M_BCGRQQ, dtx_BCGRQP, "b c g r i j, b c g r j p -> b c g r i p")

  # 2. Each chunk's own contribution to the state at its end. The last row
  # of L is exactly the decay from each position to the chunk end, already
  # masked to the chunk's last document.
  to_end_BCGRQP = einsum(L_BCGRQQ[..., -1, :], dtx_BCGRQP, "b c g r j, b c g r j p -> b c g r j p")
  states_BCGRPN = einsum(to_end_BCGRQP, B_BCGQN, "b c g r j p, b c g j n -> b c g r p n")

  # 3. Pass states across chunks with a sequential scan: linear in the number
  # of chunks. The segsum-matrix form (an nchunks x nchunks decay matrix times
  # the stacked states) measured no faster on CPU at 128 chunks, and its
  # nchunks^2 * p * n work per head grows quadratically with the length.
  chunk_decay_BCGR = jnp.exp(jnp.minimum(dA_BCGRQ.sum(-1), 0.0))
  # Decay from the chunk start through position i (inclusive): how much of
  # the entering state reaches y_i. A plain cumsum is fine here: the terms
  # all have one sign, so there is no cancellation.
  enter_decay_BCGRQ = jnp.exp(jnp.minimum(jnp.cumsum(dA_BCGRQ, axis=-1), 0.0))
  if doc_BL is not None:
    # The document live on entering chunk c is the one at the end of chunk
    # c-1 (for c = 0 the leading document, which initial_states seed).
    doc_end_BC = doc_BCQ[:, :, -1]
    enter_first_B1 = doc_BCQ[:, :1, 0] if doc_enter_B is None else doc_enter_B[:, None]
    doc_enter_BC = jnp.concatenate([enter_first_B1, doc_end_BC[:, :-1]], axis=1)
    # Ids are monotone, so the entering state survives the whole chunk iff
    # the chunk ends in the same document, and reaches exactly the positions
    # of that document.
    chunk_decay_BCGR = jnp.where((doc_end_BC == doc_enter_BC)[:, :, None, None], chunk_decay_BCGR, 0.0)
    enter_doc_BC11Q = (doc_BCQ == doc_enter_BC[:, :, None])[:, :, None, None]
    enter_decay_BCGRQ = jnp.where(enter_doc_BC11Q, enter_decay_BCGRQ, 0.0)

  def pass_state(state_BGRPN, inputs):
    decay_BGR, new_BGRPN = inputs
    return einsum(decay_BGR, state_BGRPN, "b g r, b g r p n -> b g r p n") + new_BGRPN, state_BGRPN

  h0_BGRPN = rearrange(h0_BHPN, "b (g r) p n -> b g r p n", g=g)
  final_BGRPN, enter_CBGRPN = jax.lax.scan(
      pass_state, h0_BGRPN,
      (jnp.moveaxis(chunk_decay_BCGR, 1, 0), jnp.moveaxis(states_BCGRPN, 1, 0)))

  # 4. Entering state to outputs: y_i += decay(start..i) * (C_i . state).
  C_decay_BCGRQN = einsum(enter_decay_BCGRQ, C_BCGQN, "b c g r i, b c g i n -> b c g r i n")
  y_BCGRQP = y_BCGRQP + einsum(C_decay_BCGRQN, enter_CBGRPN, "b c g r i n, c b g r p n -> b c g r i p")

  y_BLHP = rearrange(y_BCGRQP, "b c g r q p -> b (c q) (g r) p")
  return y_BLHP[:, :l], rearrange(final_BGRPN, "b g r p n -> b (g r) p n")
