"""kernels.gated_delta impl="pallas" (kernels/gated_delta_pallas*.py) against the token-by-token reference:
outputs, final state and the gradients w.r.t. q, k, v, g, beta and initial_state (the final state in the
loss); the chunk body's hand-written backward against jax.vjp of its forward in float64; the gate gradient
under strong decay against float64 finite differences; test_gated_delta.py's closed forms (exact store and
overwrite, beta = 0 and 1, state carry-over, packed documents) through impl="pallas"; the auto dispatch;
forward + backward lowered for CUDA and TPU.

On CPU the kernels run in Pallas interpret mode (the Triton-target kernels through the generic interpreter,
the TPU-target kernels through the simulated-TPU interpreter), which is slow: shapes are tiny (the GPU chunk
is 16, the TPU chunk 128). Lengths are not chunk multiples, document starts fall inside a chunk and on a
chunk edge, dk != dv, and dv = 20 (padded to 32) with block_v = 16 gives two dv tiles, so the GPU backward's
partial sums over tiles are exercised. Interpret mode does not prove that a kernel lowers for the real
backend: `test_lowers` lowers forward + backward for CUDA (Pallas -> Triton IR) and TPU (Pallas -> Mosaic
MLIR) through jax.export, which needs no device (it does not run Triton's or Mosaic's own compilers).

Tolerances (norm-relative, |err| <= rtol * max|ref|, as in test_ssd.py): float32 1e-4 (observed ~1e-7);
bfloat16 3e-2 against the float32 reference of the same bf16-rounded inputs: the kernels round matmul
operands (T, W, the state, cotangents) to bf16, with float32 accumulation (observed 3e-3..6e-3 at L 256,
dk = dv = 64, chunk 64, with documents; the XLA path, float32 inside, 7e-4..3e-3 on the same case).

`-m slow` adds bigger interpret cases.
"""

import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_gated_delta as tgd
from altbench.kernels import gated_delta_chunk as gdc
from altbench.kernels import gated_delta_pallas as gp
from test_gated_delta import ARG_NAMES, cotangents, make_inputs
from test_ssd import assert_close, documents

gd_module = importlib.import_module("altbench.kernels.gated_delta")  # kernels.gated_delta is also the function
gated_delta = gd_module.gated_delta

F32_RTOL, BF16_RTOL = 1e-4, 3e-2


def _grads(fn, inputs, seq_idx, chunk):
  """o, final state and d/d(q, k, v, g, beta, initial_state) of <o, cot_o> + <final, cot_f>, in one program
  (interpret-mode compiles dominate the test time)."""
  cot_o, cot_f = cotangents(inputs)

  def loss(*args):
    kw = dict(zip(ARG_NAMES, args))
    o, final = fn(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("g"), kw.pop("beta"), seq_idx=seq_idx,
                  chunk_size=chunk, return_final_state=True, **kw)
    return jnp.sum(o.astype(jnp.float32) * cot_o) + jnp.sum(final * cot_f), (o, final)

  grads, (o, final) = jax.jit(jax.grad(loss, argnums=tuple(range(len(ARG_NAMES))), has_aux=True))(
      *[inputs[k] for k in ARG_NAMES])
  return o, final, dict(zip(ARG_NAMES, grads))


def _pallas(target, blocks=None):
  return lambda *a, **k: gp.gated_delta_pallas(*a, target=target, block_sizes=blocks, **k)


def _compare(target, inputs, seq_idx, chunk, rtol, blocks=None):
  dtype = inputs["q"].dtype
  inputs_f32 = {k: v.astype(jnp.float32) for k, v in inputs.items()}
  ref = lambda *a, **k: gated_delta(*a, impl="reference", **k)
  with jax.default_matmul_precision("highest"):  # on a GPU/TPU the f32 reference would use TF32/bf16
    o_ref, f_ref, g_ref = _grads(ref, inputs_f32, seq_idx, chunk)
  o, final, grads = _grads(_pallas(target, blocks), inputs, seq_idx, chunk)
  assert o.dtype == dtype and o.shape == inputs["v"].shape
  assert final.dtype == jnp.float32 and final.shape == f_ref.shape
  assert_close(o, o_ref, rtol, "o")
  assert_close(final, f_ref, rtol, "final_state")
  for name in ARG_NAMES:
    assert grads[name].dtype == inputs[name].dtype, name
    assert_close(grads[name], g_ref[name], rtol, f"d/d{name}")


def test_chunk_backward_matches_vjp_of_chunk_forward_float64():
  # The hand-derived chunk backward (the body of both backward kernels) against autodiff of the chunk
  # forward, in float64 where both are exact to rounding: documents (the entering state reaching only the
  # first one, a document ending at the chunk end), strong and weak decays, dk != dv.
  c, dk, dv, scale = 16, 8, 5, 0.3
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    f64 = jnp.float64
    k = rng.standard_normal((c, dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q, k, v = (jnp.asarray(a, f64) for a in (rng.standard_normal((c, dk)), k, rng.standard_normal((c, dv))))
    g = jnp.asarray(np.where(rng.random(c) < 0.3, -10.0, -rng.uniform(0.0, 1.0, c)), f64)
    beta = jnp.asarray(rng.uniform(0.0, 1.0, c), f64)
    S = jnp.asarray(rng.standard_normal((dk, dv)), f64)
    doc = jnp.asarray((np.arange(c) >= 6).astype(np.int32) + (np.arange(c) >= 11))
    mm = gdc.make_mm(f64, f64)

    def chunk(q, k, v, beta, g, with_doc):
      cs, zero = jnp.cumsum(g)[:, None], jnp.zeros((c, 1), f64)
      docs = dict(doc=doc[:, None], doc_r=doc[None, :], ent=(doc == 0).astype(f64)[:, None]) if with_doc else {}
      return gdc.Chunk(q, k, v, beta[:, None], beta[None, :], cs, zero, cs.T, zero.T, **docs)

    do, ds_end = jnp.asarray(rng.standard_normal((c, dv)), f64), jnp.asarray(rng.standard_normal((dk, dv)), f64)

    def both(with_doc):  # one program each (eager float64 ops would each compile)
      def fwd(q, k, v, beta, g, S):
        x = chunk(q, k, v, beta, g, with_doc)
        return gdc.chunk_fwd(x, S, gdc.chunk_inverse(x, mm), mm, scale)

      want = jax.vjp(fwd, q, k, v, beta, g, S)[1]((do, ds_end))
      x = chunk(q, k, v, beta, g, with_doc)
      dq, dk_, dv_, dbeta, dg, dS = gdc.chunk_bwd(x, S, gdc.chunk_inverse(x, mm), do, ds_end, mm, scale)
      return (dq, dk_, dv_, dbeta[:, 0], dg[0], dS), want

    for with_doc in (False, True):
      got, want = jax.jit(both, static_argnums=0)(with_doc)
      for name, a, b in zip(("q", "k", "v", "beta", "g", "S"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(b))),
                                   err_msg=f"d{name}, documents={with_doc}")


# (target, GPU block sizes, l, chunk, dk, dv, document starts per row (the row count is the batch) or None,
# dtype). Each case is one interpret-mode compile and run. Starts: 21 inside a chunk, 32 on a chunk edge
# (GPU chunk 16); for the TPU (chunk 128): 60 inside, 128 on the edge.
CASES = [
    pytest.param("gpu", gp.BlockSizes(block_v=16), 37, 16, 8, 20, ((21,), (32,)), jnp.float32, id="gpu-f32-docs"),
    pytest.param("tpu", None, 150, 128, 8, 5, ((60, 128),), jnp.float32, id="tpu-f32-docs"),
    pytest.param("gpu", gp.BlockSizes(block_v=16), 37, 16, 8, 20, ((21, 36), (5, 6)), jnp.bfloat16,
                 id="gpu-bf16-docs", marks=pytest.mark.slow),
    pytest.param("gpu", None, 70, 32, 16, 8, None, jnp.float32, id="gpu-f32-nodocs", marks=pytest.mark.slow),
    pytest.param("tpu", None, 300, 128, 6, 10, ((130, 256), (127,)), jnp.bfloat16, id="tpu-bf16-3chunks",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("target,blocks,l,chunk,dk,dv,starts,dtype", CASES)
def test_matches_reference(target, blocks, l, chunk, dk, dv, starts, dtype):
  b = 2 if starts is None else len(starts)
  inputs = make_inputs(0, b=b, l=l, h=2, dk=dk, dv=dv, dtype=dtype)
  seq_idx = None if starts is None else documents(b, l, starts)
  _compare(target, inputs, seq_idx, chunk, F32_RTOL if dtype == jnp.float32 else BF16_RTOL, blocks)


def test_gate_gradient_under_strong_decay_matches_float64_finite_differences():
  # g alternates between near -10 (the state almost wiped) and near 0 inside one chunk of 64 (the
  # within-chunk sum of g reaches ~-250), with a document start inside it (as in test_gated_delta.py): d/dg
  # at the strong-decay steps is ~e^-10 times the others, so it is compared element by element against
  # central differences of the float64 reference. A dg taken as row sums minus column sums of the
  # decay-matrix gradient (the textbook route, which cancels) fails this (up to 46% off; tried).
  b, l, h, dk, dv, chunk = 1, 64, 2, 4, 3, 64
  inputs = make_inputs(11, b=b, l=l, h=h, dk=dk, dv=dv)
  rng = np.random.default_rng(12)
  strong = rng.random((b, l, h)) < 0.4
  g = np.where(strong, -10.0 + rng.uniform(-0.5, 0.5, (b, l, h)), -rng.uniform(0.0, 0.05, (b, l, h)))
  seq_idx = documents(b, l, ((40,),))
  _, _, grads = _grads(_pallas("gpu"), dict(inputs, g=jnp.asarray(g, jnp.float32)), seq_idx, chunk)
  dg = np.asarray(grads["g"], np.float64)

  doc = gd_module._document_ids(seq_idx)
  cot_o, cot_f = (np.asarray(c, np.float64) for c in cotangents(inputs))
  with jax.enable_x64(True):
    q, k, v, beta, s0 = (jnp.asarray(np.asarray(inputs[n]), jnp.float64)
                         for n in ("q", "k", "v", "beta", "initial_state"))
    q = q * dk ** -0.5

    def ref_loss(g64):
      o, final = gd_module._reference(q, k, v, g64, beta, s0, doc)
      return jnp.sum(o * cot_o) + jnp.sum(final * cot_f)

    eps = 1e-6
    steps = jnp.asarray(eps * np.eye(g.size).reshape((g.size,) + g.shape))
    g64 = jnp.asarray(g, jnp.float64)
    plus, minus = (jax.jit(jax.vmap(ref_loss))(g64 + sign * steps) for sign in (1, -1))
    dg_fd = np.asarray((plus - minus) / (2 * eps)).reshape(g.shape)

  assert np.abs(dg_fd[strong]).max() < 1e-3 * np.abs(dg_fd).max()  # the strong-decay gradients are tiny
  np.testing.assert_allclose(dg, dg_fd, rtol=1e-3, atol=1e-7 * np.abs(dg_fd).max())


def test_dispatch_runs_a_pallas_kernel_and_optional_arguments_absent():
  # Through kernels.gated_delta(impl="pallas") (GPU-target kernels, interpreted on CPU), with a
  # pallas_call really in the program; no initial_state, no final state, a custom scale, no documents.
  inputs = make_inputs(3, b=1, l=21, h=1, dk=4, dv=4)
  args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
  cot = jnp.asarray(np.random.default_rng(4).standard_normal(args[2].shape), jnp.float32)

  def loss(impl, *a):
    o = gated_delta(*a, scale=0.7, chunk_size=16, impl=impl)
    return jnp.sum(o * cot), o

  assert "pallas_call" in str(jax.make_jaxpr(functools.partial(loss, "pallas"))(*args))
  grad = lambda impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3, 4), has_aux=True))(*args)
  (grads, o), (grads_ref, o_ref) = grad("pallas"), grad("reference")
  assert_close(o, o_ref, F32_RTOL, "o")
  for name, a, r in zip(("q", "k", "v", "g", "beta"), grads, grads_ref):
    assert_close(a, r, F32_RTOL, f"d/d{name}")


@pytest.mark.parametrize("check", [
    tgd.test_orthonormal_keys_store_and_overwrite_exactly,
    pytest.param(tgd.test_beta_one_reads_back_the_value_just_written, marks=pytest.mark.slow),
    pytest.param(tgd.test_beta_zero_only_decays_the_initial_state, marks=pytest.mark.slow),
    pytest.param(tgd.test_split_and_carry_state_equals_one_pass, marks=pytest.mark.slow),
    pytest.param(tgd.test_packed_documents_equal_separate_runs, marks=pytest.mark.slow),
], ids=lambda f: f.__name__.removeprefix("test_"))
def test_closed_forms_and_state_conventions(check):
  # test_gated_delta.py's exact properties of the delta rule (beta = 1 and repeated keys: the inverse at its
  # hardest, T with entries of both signs that must cancel exactly), and of state carry-over and packed
  # documents, run through impl="pallas".
  check("pallas")


def test_auto_dispatch_policy(monkeypatch):
  q_shape, v_shape = (1, 256, 4, 128), (1, 256, 4, 128)
  monkeypatch.delenv("ALTBENCH_GATED_DELTA_AUTO", raising=False)
  pick = lambda q=q_shape, v=v_shape, dtype=jnp.bfloat16: gd_module._auto_impl(q, v, dtype)
  if jax.default_backend() == "cpu":
    assert pick() == "xla"                                     # CPU default stays xla
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.setattr(gp, "backend_target", lambda backend=None: "gpu")
  assert gd_module.AUTO_PALLAS_TARGETS == () and pick() == "xla"  # not on hardware before it has been measured
  monkeypatch.setattr(gd_module, "AUTO_PALLAS_TARGETS", ("gpu", "tpu"))
  monkeypatch.setattr(gp, "backend_target", lambda backend=None: "gpu")
  assert pick() == "pallas"
  assert pick(dtype=jnp.float32) == "xla"                      # float32 on GPU: off the tensor cores
  monkeypatch.setattr(gp, "backend_target", lambda backend=None: "tpu")
  assert pick() == "pallas"
  assert pick(dtype=jnp.float32) == "pallas"
  assert pick(q=(1, 1, 4, 128), v=(1, 1, 4, 128)) == "xla"     # decode-like: one position
  assert pick(v=(1, 256, 4, 512)) == "xla"                     # dv > 256: unsupported
  assert pick(dtype=jnp.float64) == "xla"
  monkeypatch.setattr(jax, "device_count", lambda *a: 8)
  assert pick() == "xla"                                       # several devices, no mesh in context
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.setenv("ALTBENCH_GATED_DELTA_AUTO", "xla")
  assert pick() == "xla"
  monkeypatch.setenv("ALTBENCH_GATED_DELTA_AUTO", "pallas")
  monkeypatch.setattr(gp, "backend_target", lambda backend=None: None)
  assert pick() == "pallas"
  monkeypatch.setenv("ALTBENCH_GATED_DELTA_AUTO", "cuda")
  with pytest.raises(ValueError, match="ALTBENCH_GATED_DELTA_AUTO"):
    pick()


def test_unsupported_raises():
  inputs = make_inputs(1, b=1, l=8, h=1, dk=300, dv=4)
  with pytest.raises(NotImplementedError, match="dk 300"):
    gated_delta(*[inputs[n] for n in ("q", "k", "v", "g", "beta")], impl="pallas")
  with pytest.raises(ValueError, match="target='cuda'"):
    gp.gated_delta_pallas(*[inputs[n] for n in ("q", "k", "v", "g", "beta")], target="cuda")
  assert "pallas" in gd_module.IMPLS
  assert gp.internal_chunk("gpu", 48, 1000) == 64 and gp.internal_chunk("gpu", 64, 20) == 32
  assert gp.internal_chunk("tpu", 64, 1000) == 128 and gp.internal_chunk("tpu", 256, 150) == 256


@pytest.mark.parametrize("target", ["gpu", "tpu"])
@pytest.mark.parametrize("variant", ["bf16-docs", pytest.param("f32-nodocs", marks=pytest.mark.slow)])
def test_lowers(target, variant):
  # Forward + backward lowered for the real backend without a device: Pallas -> Triton IR for CUDA (the
  # Triton compiler itself only runs on a GPU) and Pallas -> Mosaic MLIR for TPU. Realistic head sizes:
  # dk 128, dv 64 (bf16, 4 chunks of 64 with documents and an initial state) or dv 128 (f32, no documents).
  bf16 = variant == "bf16-docs"
  b, l, h, dk, dv, chunk = (1, 200, 2, 128, 64, 64) if bf16 else (1, 200, 2, 128, 128, 64)
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  rng = np.random.default_rng(0)
  mk = lambda shape, dt=dtype: jnp.asarray(rng.standard_normal(shape), dt)
  args = (mk((b, l, h, dk)), mk((b, l, h, dk)), mk((b, l, h, dv)), -jnp.abs(mk((b, l, h), jnp.float32)),
          jax.nn.sigmoid(mk((b, l, h), jnp.float32)), mk((b, h, dk, dv), jnp.float32))
  seq_idx = jnp.asarray(np.arange(l)[None] // 90, jnp.int32) if bf16 else None

  def loss(q, k, v, g, beta, s0):
    o, final = gp.gated_delta_pallas(q, k, v, g, beta, initial_state=s0, seq_idx=seq_idx, chunk_size=chunk,
                                     return_final_state=True, target=target, interpret=False)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

  platform = {"gpu": "cuda", "tpu": "tpu"}[target]
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=tuple(range(6)))), platforms=[platform],
                               disabled_checks=checks)(*args)
  kernels = set(re.findall(r"altbench_gated_delta_[a-z_]+", exported.mlir_module()))
  suffix = "" if target == "gpu" else "_tpu"
  assert {f"altbench_gated_delta_{k}{suffix}" for k in ("inverse", "fwd", "bwd")} <= kernels, kernels


@pytest.mark.slow
def test_no_nan_for_extreme_gates():
  # g down to -200 (exp underflows to 0), beta exactly 0 and 1, bf16, documents.
  inputs = make_inputs(7, b=1, l=70, h=2, dk=4, dv=4, dtype=jnp.bfloat16)
  rng = np.random.default_rng(8)
  inputs["g"] = jnp.asarray(rng.choice([-200.0, -1e-4, 0.0], (1, 70, 2)), jnp.float32)
  inputs["beta"] = jnp.asarray(rng.choice([0.0, 1.0], (1, 70, 2)), jnp.float32)
  o, final, grads = _grads(_pallas("gpu"), inputs, documents(1, 70, ((33,),)), 16)
  for name, value in [("o", o), ("final", final)] + list(grads.items()):
    assert bool(jnp.all(jnp.isfinite(value.astype(jnp.float32)))), f"non-finite {name}"


def test_gpu_block_sizes_follow_the_tuned_table(tmp_path, monkeypatch):
  # A gated_delta_pallas entry for this device kind and shape class sets the GPU launch parameters (clamped
  # to the padded dv); another class keeps the hand default; the TPU kernels take no block sizes.
  from altbench.kernels import tuning
  monkeypatch.setenv(tuning.TABLE_ENV, str(tmp_path / "blocks.json"))
  assert gp.default_block_sizes("gpu", 128, 128) == gp._GPU_DEFAULT
  tuning.write_entries({tuning.key("gated_delta_pallas", tuning.device_kind(), "k128v128"):
                        {"block_v": 128, "num_warps": 4, "num_stages": 2}})
  assert gp.default_block_sizes("gpu", 128, 128) == gp.BlockSizes(128, 4, 2)
  assert gp.default_block_sizes("gpu", 128, 64) == gp._GPU_DEFAULT                  # class k128v64
  assert gp.default_block_sizes("gpu", 128, 32) == gp.BlockSizes(32, 8, 1)          # block_v clamped to dv


# ---- compiled kernels on a device (opt-in: -m gpu / -m tpu; not yet run: no device was available) -------

_DEVICE_CASES = [  # (b, L, h, dk, dv, chunk, documents, dtype)
    (2, 1024, 4, 128, 128, 64, False, jnp.bfloat16),
    (2, 1000, 4, 128, 64, 64, True, jnp.bfloat16),
    (1, 777, 2, 64, 128, 64, True, jnp.float32),
    (1, 2048, 2, 256, 256, 64, True, jnp.bfloat16),
]


def _device_case(b, l, h, dk, dv, chunk, docs, dtype):
  inputs = make_inputs(7, b=b, l=l, h=h, dk=dk, dv=dv, dtype=dtype)
  seq_idx = jnp.asarray(np.arange(l)[None].repeat(b, 0) // 300, jnp.int32) if docs else None
  args = [inputs[n] for n in ("q", "k", "v", "g", "beta")]
  assert "pallas_call" in str(jax.make_jaxpr(lambda *a: gated_delta(*a, chunk_size=chunk, impl="pallas"))(*args))
  _compare(jax.default_backend(), inputs, seq_idx, chunk, F32_RTOL if dtype == jnp.float32 else BF16_RTOL)


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
