"""kernels.attention: the XLA path against the plain reference, outputs and gradients; impl="cudnn"'s refusals
and lowering, and impl="auto"'s GPU choice between cuDNN and the flash kernels."""

import importlib
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altbench.kernels import attention

attention_module = importlib.import_module("altbench.kernels.attention")  # kernels.attention is also the function


def _inputs(b, t, h, hk, d, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, h, d), dtype)
  k = jax.random.normal(ks[1], (b, t, hk, d), dtype)
  v = jax.random.normal(ks[2], (b, t, hk, d), dtype)
  seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.1, (b, t)), axis=1).astype(jnp.int32)
  return q, k, v, seg


@pytest.mark.parametrize("t,h,hk,causal,use_seg", [
    (17, 4, 4, True, False), (33, 4, 2, True, True), (31, 6, 1, False, True), (8, 2, 2, False, False),
    (128, 4, 2, True, True),   # 128: the blocked causal XLA path
    (1280, 2, 1, True, True)])  # 20 blocks of 64 merged into 10 of 128 (MAX_CAUSAL_BLOCKS)
def test_xla_matches_reference(t, h, hk, causal, use_seg):
  q, k, v, seg = _inputs(2, t, h, hk, 16)
  seg = seg if use_seg else None
  cot = jax.random.normal(jax.random.key(9), q.shape)

  def f(impl):
    return lambda q, k, v: jnp.sum(attention(q, k, v, causal=causal, segment_ids=seg, impl=impl) * cot)

  ref, xla = f("reference"), f("xla")
  np.testing.assert_allclose(jax.jit(xla)(q, k, v), jax.jit(ref)(q, k, v), rtol=1e-4, atol=1e-3)
  grads = lambda fn: jax.jit(jax.grad(fn, (0, 1, 2)))(q, k, v)  # jit: op-by-op dispatch is the slow part
  for g_x, g_r in zip(grads(xla), grads(ref)):
    np.testing.assert_allclose(g_x, g_r, rtol=1e-4, atol=1e-4)


def test_reference_closed_form():
  # One key visible per query (causal, t=2, first row) -> output is exactly that value; uniform logits
  # (q = 0) -> the mean of the visible values.
  v = jnp.arange(2 * 3, dtype=jnp.float32).reshape(1, 2, 1, 3)
  q = jnp.zeros((1, 2, 1, 3))
  out = attention(q, v, v, causal=True, impl="reference")
  np.testing.assert_allclose(out[0, 0, 0], v[0, 0, 0])
  np.testing.assert_allclose(out[0, 1, 0], v[0, :, 0].mean(0))


def test_segments_block_leakage():
  q, k, v, _ = _inputs(1, 12, 2, 2, 8)
  seg = jnp.array([[1] * 5 + [2] * 7])
  full = attention(q, k, v, causal=True, segment_ids=seg, impl="xla")
  second = attention(q[:, 5:], k[:, 5:], v[:, 5:], causal=True, impl="xla")
  np.testing.assert_allclose(full[:, 5:], second, rtol=1e-5, atol=1e-5)


def test_kv_cache_style_mask():
  q, k, v, _ = _inputs(1, 9, 2, 1, 8)
  valid = (jnp.arange(9) <= 4).astype(jnp.int32)[None]
  out = attention(q[:, 4:5], k, v, causal=False, segment_ids=(jnp.ones((1, 1), jnp.int32), valid), impl="xla")
  ref = attention(q[:, :5], k[:, :5], v[:, :5], causal=True, impl="reference")[:, 4:5]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_close_to_f32():
  q, k, v, seg = _inputs(2, 20, 4, 2, 16)
  out = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                  causal=True, segment_ids=seg, impl="xla")
  ref = attention(q, k, v, causal=True, segment_ids=seg, impl="reference")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)


def test_errors_name_the_problem():
  q, k, v, _ = _inputs(1, 4, 3, 2, 8)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    attention(q, k, v, causal=True)
  q, k, v, _ = _inputs(1, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="impl='cuda'"):
    attention(q, k, v, causal=True, impl="cuda")


def test_explicit_mask_combines_with_causal_and_segments():
  q, k, v, seg = _inputs(2, 12, 2, 2, 8)
  rng = np.random.default_rng(0)
  mask = jnp.asarray(rng.random((12, 12)) < 0.6) | jnp.eye(12, dtype=bool)
  for impl in ("reference", "xla"):
    out = attention(q, k, v, causal=True, segment_ids=seg, mask=mask, impl=impl)
    # The same visibility written as one explicit (b, T, S) mask.
    full = mask[None] & jnp.tril(jnp.ones((12, 12), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    want = attention(q, k, v, causal=False, mask=full, impl="reference")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # and it does restrict: dropping the mask changes the output
  assert not np.allclose(attention(q, k, v, causal=True, segment_ids=seg, impl="xla"), out, atol=1e-3)


# --------------------------------------------------------------------------------------------
# impl="cudnn" and auto's GPU choice between cuDNN and the flash kernels


def test_cudnn_refuses_clearly_where_it_cannot_run():
  q, k, v, seg = _inputs(1, 16, 2, 2, 16, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"impl='cudnn'.*CUDA GPU.*'cpu'.*impl='pallas'"):
    attention(q, k, v, causal=True, impl="cudnn")
  # What cuDNN refuses on a GPU, each named (checked without one: backend and head_dim limit given).
  why = lambda shape=(1, 16, 2, 64), dtype=jnp.bfloat16, **kw: attention_module.cudnn_unsupported(
      shape, shape, dtype, backend="gpu", max_head_dim=128, **kw)
  assert why() == "" and why(dtype=jnp.float16) == "" and why((1, 16, 2, 128)) == ""
  assert "float32" in why(dtype=jnp.float32) and "bfloat16 or float16" in why(dtype=jnp.float32)
  assert "head_dim 20" in why((1, 16, 2, 20)) and "head_dim 256" in why((1, 16, 2, 256))
  assert attention_module.cudnn_unsupported((1, 16, 2, 256), (1, 16, 2, 256), jnp.bfloat16, backend="gpu",
                                            max_head_dim=256) == ""
  assert "mask" in why(mask=jnp.ones((16, 16), bool))
  assert "segment_ids" in why(has_segment_ids=True)


def test_cudnn_lowers_for_cuda(monkeypatch):
  # Forward + backward through kernels.attention(impl="cudnn") exported for CUDA, on a pretended GPU backend.
  # jax lowers cuDNN attention only where it finds cuDNN (the CUDA plugin): skipped on a CPU-only install.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  sds = lambda hk: jax.ShapeDtypeStruct((2, 128, hk, 64), jnp.bfloat16)

  def loss(q, k, v):
    return jnp.sum(attention(q, k, v, causal=True, impl="cudnn").astype(jnp.float32))

  calls = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
  checks = [jax.export.DisabledSafetyCheck.custom_call(c) for c in calls]
  try:
    exported = jax.export.export(jax.jit(jax.grad(loss, (0, 1, 2))), platforms=["cuda"], disabled_checks=checks)(
        sds(4), sds(2), sds(2))
  except RuntimeError as e:
    if "cuDNN is not detected" in str(e):
      pytest.skip(f"lowering cuDNN attention needs cuDNN (jax's CUDA plugin) installed: {e}")
    raise
  found = set(re.findall(r"__cudnn\$fmha[A-Za-z0-9]+", exported.mlir_module()))
  assert set(calls) <= found, f"the cuDNN fused attention forward and backward custom calls; found {found}"


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("d", [64, 128])
def test_cudnn_matches_reference_on_gpu(d):
  # bf16, causal, GQA: output and dq, dk, dv against the float32 reference of the same bf16 inputs.
  q, k, v, _ = _inputs(2, 256, 4, 2, d, dtype=jnp.bfloat16)
  cot = jax.random.normal(jax.random.key(3), q.shape)
  f32 = lambda x: x.astype(jnp.float32)

  def run(impl, *args):
    loss = lambda q, k, v: jnp.sum(f32(attention(q, k, v, causal=True, impl=impl)) * cot)
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(*args)

  got = run("cudnn", q, k, v)
  with jax.default_matmul_precision("highest"):
    want = run("reference", f32(q), f32(k), f32(v))
  np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
  for name, g, w in zip(("dq", "dk", "dv"), got[1], want[1]):
    np.testing.assert_allclose(f32(g), w, rtol=5e-2, atol=5e-2, err_msg=name)


@pytest.fixture
def kernel_table(tmp_path, monkeypatch):
  """An empty tuning table of our own (ALTBENCH_KERNEL_TABLE); returns a function that sets entries in it."""
  from altbench.kernels import tuning
  path = str(tmp_path / "table.json")
  monkeypatch.setenv(tuning.TABLE_ENV, path)
  monkeypatch.delenv("ALTBENCH_ATTENTION_AUTO", raising=False)
  return lambda entries: tuning.write_entries(
      {tuning.key(op, tuning.device_kind(), cls): params for (op, cls), params in entries.items()}, path)


def test_auto_chooses_cudnn_or_flash_on_gpu_from_the_tuning_table(kernel_table):
  auto = lambda d=64, dtype=jnp.bfloat16, seg=False, target="gpu", t=256: attention_module._auto_impl(
      (2, t, 4, d), (2, t, 2, d), None, dtype, seg, target=target)
  assert auto() == "pallas" and auto(128) == "pallas", "no entry: the flash kernels"
  kernel_table({("attention_gpu_impl", "d64"): {"impl": "cudnn"}, ("attention_gpu_impl", "d128"): {"impl": "pallas"}})
  assert auto() == "cudnn" and auto(dtype=jnp.float16) == "cudnn"
  assert auto(128) == "pallas", "the d128 entry says pallas"
  assert auto(seg=True) == "pallas", "cuDNN has no segment ids: the flash kernels take them"
  assert auto(48) == "cudnn", "head_dim 48 is in the d64 class"
  assert auto(20) == "pallas", "cuDNN needs a multiple of 8"
  assert auto(dtype=jnp.float32) == "xla", "float32 on GPU: neither fused kernel pays (tuning.pallas_dtype_pays)"
  assert auto(t=8) == "xla", "short queries stay on XLA"
  assert auto(target="tpu") == "pallas" and auto(target=None) == "xla", "the entry is for GPUs only"
  kernel_table({("attention_gpu_impl", "d64"): {"impl": "flash"}})
  with pytest.raises(ValueError, match="attention_gpu_impl.*'cudnn' or 'pallas'"):
    auto()


def test_tune_command_times_cudnn_against_flash_on_gpu():
  # `altbench bench kernels --tune` on a GPU: both impls per head_dim class through impl="auto", after the flash
  # blocks are tuned (the comparison then uses them).
  import os
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(root, "experiments/bench/kernels.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  ops = [(op, cls, cands) for op, cls, _, cands in bench.cases("gpu", quick=False)]
  impl_cases = [(cls, cands) for op, cls, cands in ops if op == "attention_gpu_impl"]
  assert impl_cases == [("d64", [{"impl": "pallas"}, {"impl": "cudnn"}]), ("d128", [{"impl": "pallas"}, {"impl": "cudnn"}])]
  names = [op for op, _, _ in ops]
  assert max(i for i, n in enumerate(names) if n == "flash_attention") < names.index("attention_gpu_impl")
  assert "attention_gpu_impl" not in {op for op, *_ in bench.cases("tpu", quick=False)}
