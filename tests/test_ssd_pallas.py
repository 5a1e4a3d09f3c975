"""kernels.ssd_pallas (impl="pallas") against the sequential reference: outputs, final states and
the gradients w.r.t. every input (x, dt, A, B, C, D, z, dt_bias, initial_states, with final_states
in the loss).

On CPU everything runs in Pallas interpret mode (the Triton-target kernels through the generic
interpreter, the TPU-target kernels through the simulated-TPU interpreter, pltpu.InterpretParams),
which is slow, so shapes are tiny and GPU tiles small (16) to get several tiles per chunk. Lengths
(37, 150) are not chunk multiples; document starts fall inside a chunk and on a chunk edge.
Interpret mode does not prove that a kernel lowers for the real backend, so `test_lowers` also
lowers forward + backward for CUDA (Pallas -> Triton IR) and TPU (Pallas -> Mosaic MLIR) through
jax.export, which needs no device (it does not run Triton's or Mosaic's own compilers).

Tolerances (norm-relative, |err| <= rtol * max|ref|, as in test_ssd.py): float32 1e-4 (observed
~1e-7..1e-6); bfloat16 2e-2 against the float32 reference of the same bf16-rounded inputs
(observed ~2e-3..6e-3; the XLA path shows ~1e-3..5e-3 on the same case): the kernels round the
matmul operands (decay-weighted C B^T tiles, states, cotangents) to bf16, float32 accumulation.

`-m slow` adds bigger interpret cases; `-m gpu` / `-m tpu` run the compiled kernels on a device at
realistic shapes.
"""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altbench.kernels import ssd_pallas as sp
from test_ssd import ARG_NAMES, assert_close, documents, make_inputs

ssd_module = importlib.import_module("altbench.kernels.ssd")  # kernels.ssd is also the name of the function
ssd = ssd_module.ssd

F32_RTOL, BF16_RTOL = 1e-4, 2e-2


def _grads(fn, inputs, seq_idx, chunk, dt_softplus=True, seed=100):
  """y, final_states and d/d(every non-None input) of <y, cot_y> + <final, cot_f>, in one program
  (interpret-mode compiles dominate the test time)."""
  names = [k for k in ARG_NAMES if inputs[k] is not None]
  b, l, h, p = inputs["x"].shape
  n = inputs["B"].shape[-1]
  rng = np.random.default_rng(seed)
  cot_y = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)
  cot_f = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)

  def loss(*args):
    kw = dict(zip(names, args))
    y, final = fn(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), chunk,
                  seq_idx=seq_idx, dt_softplus=dt_softplus, return_final_states=True, **kw)
    return jnp.sum(y.astype(jnp.float32) * cot_y) + jnp.sum(final * cot_f), (y, final)

  grads, (y, final) = jax.jit(jax.grad(loss, argnums=tuple(range(len(names))), has_aux=True))(
      *[inputs[k] for k in names])
  return y, final, dict(zip(names, grads))


def _compare(pallas_fn, inputs, seq_idx, chunk, rtol, dt_softplus=True):
  dtype = inputs["x"].dtype
  inputs_f32 = {k: None if v is None else v.astype(jnp.float32) for k, v in inputs.items()}
  ref_fn = lambda *a, **k: ssd(*a, impl="reference", **k)
  with jax.default_matmul_precision("highest"):  # on a GPU/TPU the f32 reference would use TF32/bf16
    y_ref, f_ref, g_ref = _grads(ref_fn, inputs_f32, seq_idx, chunk, dt_softplus)
  y, final, grads = _grads(pallas_fn, inputs, seq_idx, chunk, dt_softplus)
  assert y.dtype == dtype and y.shape == inputs["x"].shape
  assert final.dtype == jnp.float32 and final.shape == f_ref.shape
  assert_close(y, y_ref, rtol, "y")
  assert_close(final, f_ref, rtol, "final_states")
  assert set(grads) == set(g_ref)
  for name in g_ref:
    assert grads[name].dtype == inputs[name].dtype, name
    assert_close(grads[name], g_ref[name], rtol, f"d/d{name}")


def _pallas(target, blocks=None):
  return lambda *a, **k: sp.ssd_pallas(*a, target=target, block_sizes=blocks, **k)


# (target, GPU tiles (block_m, block_k, block_p, heads), l, chunk, ngroups, D per channel, z,
#  document starts per row (the row count is the batch) or None, dtype). Each case is one
# interpret-mode compile and run (~6-10 s of CPU). Starts: 21 inside a chunk, 32 on a chunk edge
# (chunk 16); for the TPU (chunk 128): 60 inside, 128 on the edge.
CASES = [
    ("gpu", sp.BlockSizes(16, 16, 8, 2), 37, 16, 2, True, True, ((21,), (32,)), jnp.float32),
    ("gpu", sp.BlockSizes(16, 16, 8, 4), 37, 16, 1, False, True, ((21, 36), (5, 6)), jnp.bfloat16),
    ("tpu", None, 150, 128, 2, True, True, ((60, 128),), jnp.float32),
    pytest.param("gpu", sp.BlockSizes(32, 16, 8, 1), 130, 64, 1, False, False, ((40,), (64, 65)),
                 jnp.float32, marks=pytest.mark.slow),
    pytest.param("gpu", sp.BlockSizes(16, 32, 8, 2), 130, 64, 2, False, True, ((), ()), jnp.float32,
                 marks=pytest.mark.slow),
    pytest.param("gpu", sp.BlockSizes(16, 32, 4, 4), 130, 64, 1, True, False, ((5, 63), (31,)),
                 jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param("tpu", None, 300, 128, 1, False, True, ((130, 256), (127,)), jnp.bfloat16,
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("target,blocks,l,chunk,g,d_per_channel,with_z,starts,dtype", CASES,
                         ids=["gpu-f32-g2-docs", "gpu-bf16-docs", "tpu-f32-g2-docs",
                              "gpu-f32-tiles32x16", "gpu-f32-tiles16x32-nodocs", "gpu-bf16-heads4",
                              "tpu-bf16-3chunks"])
def test_matches_reference(target, blocks, l, chunk, g, d_per_channel, with_z, starts, dtype):
  nodocs = all(len(row) == 0 for row in starts)
  inputs = make_inputs(0, b=len(starts), l=l, g=g, dtype=dtype, d_per_channel=d_per_channel, with_z=with_z)
  seq_idx = None if nodocs else documents(len(starts), l, starts)
  _compare(_pallas(target, blocks), inputs, seq_idx, chunk, F32_RTOL if dtype == jnp.float32 else BF16_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_optional_arguments_absent(target):
  # No D, z, dt_bias or initial_states, no softplus but a dt_limit: the None paths of the
  # custom_vjp (zero initial state, no gate) and the clamp in front of it.
  inputs = make_inputs(3, l=45, g=1, with_z=False)
  inputs.update(D=None, dt_bias=None, initial_states=None, dt=jnp.abs(inputs["dt"]) + 0.05)
  fn = lambda *a, **k: sp.ssd_pallas(*a, target=target, dt_limit=(0.1, 2.0), **k)
  ref = lambda *a, **k: ssd(*a, impl="reference", dt_limit=(0.1, 2.0), **k)
  y, f, g = _grads(fn, inputs, None, 16, dt_softplus=False)
  y_ref, f_ref, g_ref = _grads(ref, inputs, None, 16, dt_softplus=False)
  assert set(g) == {"x", "dt", "A", "B", "C"}
  for name, a, r in [("y", y, y_ref), ("final", f, f_ref)] + [(k, g[k], g_ref[k]) for k in g_ref]:
    assert_close(a, r, F32_RTOL, name)


def test_dispatch_and_segsum_stability():
  # Through kernels.ssd(impl="pallas") (GPU-target kernels, interpreted on CPU), with a pallas_call
  # really in the program. Huge steps then tiny ones inside one chunk: the within-chunk cumsum of
  # dt*A reaches -3200, so differencing running sums would put ~1e-4 relative error into the
  # decay factors of the tiny steps; the compensated (hi, lo) segment sums keep it at rounding.
  l = 64
  dt = np.full((1, l, 1), 0.01, np.float32)
  dt[0, :32, 0] = 100.0
  rng = np.random.default_rng(9)
  x, B, C = (jnp.asarray(rng.uniform(0.5, 1.5, (1, l, 1, 1)), jnp.float32) for _ in range(3))
  args = (x, jnp.asarray(dt), -jnp.ones((1,)), B, C, l)
  jaxpr = jax.make_jaxpr(lambda x, dt, A, B, C: ssd(x, dt, A, B, C, l, impl="pallas"))(*args[:5])
  assert "pallas_call" in str(jaxpr)
  y_ref, y = (np.asarray(ssd(*args, impl=impl))[0, 32:, 0, 0] for impl in ("reference", "pallas"))
  np.testing.assert_allclose(y, y_ref, rtol=2e-5)


def test_auto_dispatch_policy(monkeypatch):
  shape_x, shape_b = (1, 256, 4, 64), (1, 256, 1, 128)
  monkeypatch.delenv("ALTBENCH_SSD_AUTO", raising=False)
  pick = lambda x=shape_x, b=shape_b, dtype=jnp.bfloat16: ssd_module._auto_impl(x, b, dtype)
  if jax.default_backend() == "cpu":
    assert pick() == "xla"                                     # CPU default stays xla
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.setattr(sp, "backend_target", lambda backend=None: "gpu")
  assert pick() == "pallas"
  assert pick(dtype=jnp.float32) == "xla"                      # float32 on GPU: off the tensor cores
  monkeypatch.setattr(sp, "backend_target", lambda backend=None: "tpu")
  assert pick() == "pallas"
  assert pick(dtype=jnp.float32) == "pallas"
  assert pick(x=(1, 1, 4, 64), b=(1, 1, 1, 128)) == "xla"      # decode-like: one position
  assert pick(x=(1, 256, 4, 512)) == "xla"                     # headdim > 256: unsupported
  assert pick(dtype=jnp.float64) == "xla"
  monkeypatch.setattr(jax, "device_count", lambda *a: 8)
  assert pick() == "xla"                                       # sharded: not partitionable
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.setenv("ALTBENCH_SSD_AUTO", "xla")
  assert pick() == "xla"
  monkeypatch.setenv("ALTBENCH_SSD_AUTO", "pallas")
  monkeypatch.setattr(sp, "backend_target", lambda backend=None: None)
  assert pick() == "pallas"
  monkeypatch.setenv("ALTBENCH_SSD_AUTO", "cuda")
  with pytest.raises(ValueError, match="ALTBENCH_SSD_AUTO"):
    pick()


def test_unsupported_raises():
  inputs = make_inputs(1, l=8, p=300, with_z=False)
  with pytest.raises(NotImplementedError, match="headdim"):
    ssd(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], 4, impl="pallas")
  assert "pallas" in ssd_module.IMPLS
  assert sp.internal_chunk("gpu", 48, 1000) == 64 and sp.internal_chunk("gpu", 256, 37) == 64
  assert sp.internal_chunk("tpu", 64, 1000) == 128 and sp.internal_chunk("tpu", 256, 150) == 256


@pytest.mark.parametrize("target", ["gpu", "tpu"])
@pytest.mark.parametrize("variant", ["bf16-docs", "f32-nodocs"])
def test_lowers(target, variant):
  # Forward + backward lowered for the real backend without a device: Pallas -> Triton IR for
  # CUDA (the Triton compiler itself only runs on a GPU) and Pallas -> Mosaic MLIR for TPU.
  # bf16: 3 chunks of 256 (the last one padded), documents, all optional inputs, headdim 64,
  # 2 groups. f32: chunk 64, no documents (the unmasked tile loops), headdim 128, dstate 256
  # (8 warps, 32-row tiles), one group of 4 heads.
  bf16 = variant == "bf16-docs"
  b, l, h, p, g, n, chunk = (1, 700, 4, 64, 2, 128, 256) if bf16 else (1, 200, 4, 128, 1, 256, 64)
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  rng = np.random.default_rng(0)
  mk = lambda shape, dtype=dtype: jnp.asarray(rng.standard_normal(shape), dtype)
  args = (mk((b, l, h, p)), mk((b, l, h), jnp.float32), -jnp.ones((h,)), mk((b, l, g, n)),
          mk((b, l, g, n)), jnp.ones((h,)), mk((b, l, h, p)), mk((b, h, p, n), jnp.float32))
  seq_idx = jnp.asarray(np.arange(l)[None] // 300, jnp.int32) if bf16 else None

  def loss(x, dt, A, B, C, D, z, h0):
    y, final = sp.ssd_pallas(x, dt, A, B, C, chunk, D=D, z=z, initial_states=h0, seq_idx=seq_idx,
                             dt_softplus=True, return_final_states=True, target=target, interpret=False)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final)

  platform = {"gpu": "cuda", "tpu": "tpu"}[target]
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=tuple(range(8)))), platforms=[platform],
                               disabled_checks=checks)(*args)
  kernels = set(re.findall(r"altbench_ssd_[a-z_]+", exported.mlir_module()))
  names = ["chunk_outer", "state_pass", "chunk_scan"]
  names += ["bwd_rows", "bwd_cols"] if target == "gpu" else ["bwd"]
  suffix = "" if target == "gpu" else "_tpu"
  expected = {f"altbench_ssd_{k}{suffix}" for k in names} | {f"altbench_ssd_state_pass{suffix}_bwd"}
  assert expected <= kernels, (expected, kernels)


@pytest.mark.slow
def test_no_nan_for_adversarial_inputs():
  # Strong decay, huge and negative raw steps (softplus past its threshold), bf16, documents.
  b, l, h, p, g, n = 1, 700, 2, 4, 1, 4
  rng = np.random.default_rng(5)
  bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
  raw_dt = rng.uniform(-30.0, 100.0, (b, l, h))
  raw_dt[:, ::7] = 10.0
  args = (bf16(rng.standard_normal((b, l, h, p))), bf16(raw_dt), -jnp.array([16.0, 0.01]),
          bf16(rng.standard_normal((b, l, g, n))), bf16(rng.standard_normal((b, l, g, n))),
          bf16(rng.standard_normal((b, h, p, n))))
  seq_idx = jnp.asarray(np.arange(l)[None] // 300, jnp.int32)

  def loss(x, dt, A, B, C, h0):
    y, final = sp.ssd_pallas(x, dt, A, B, C, 64, initial_states=h0, seq_idx=seq_idx, dt_softplus=True,
                             return_final_states=True, target="gpu")
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final), (y, final)

  grads, (y, final) = jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))(*args)
  for name, v in [("y", y), ("final", final)] + list(zip(["x", "dt", "A", "B", "C", "h0"], grads)):
    assert bool(jnp.all(jnp.isfinite(v.astype(jnp.float32)))), f"non-finite {name}"


# ---- compiled kernels on a device (opt-in: -m gpu / -m tpu) -------------------------------------

_DEVICE_CASES = [  # (b, L, h, p, g, n, chunk, documents, dtype)
    (2, 1024, 8, 64, 1, 128, 256, False, jnp.bfloat16),
    (2, 1000, 8, 64, 2, 128, 128, True, jnp.bfloat16),
    (1, 777, 4, 64, 1, 64, 64, True, jnp.float32),
    (2, 512, 4, 32, 1, 16, 64, False, jnp.bfloat16),
    (1, 2048, 4, 128, 1, 256, 256, True, jnp.bfloat16),
]


def _device_case(b, l, h, p, g, n, chunk, docs, dtype):
  inputs = make_inputs(7, b=b, l=l, h=h, p=p, g=g, n=n, dtype=dtype, d_per_channel=True)
  seq_idx = jnp.asarray(np.arange(l)[None].repeat(b, 0) // 300, jnp.int32) if docs else None
  fn = lambda *a, **k: ssd(*a, impl="pallas", **k)
  jaxpr = str(jax.make_jaxpr(lambda x, dt, A, B, C: fn(x, dt, A, B, C, chunk))(
      *[inputs[k] for k in ("x", "dt", "A", "B", "C")]))
  assert "pallas_call" in jaxpr
  _compare(fn, inputs, seq_idx, chunk, F32_RTOL if dtype == jnp.float32 else BF16_RTOL)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("case", _DEVICE_CASES)
def test_gpu_compiled_matches_reference(case):
  _device_case(*case)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("case", _DEVICE_CASES[:3])
def test_tpu_compiled_matches_reference(case):
  _device_case(*case)
