"""kernels.flash_attention (impl="pallas") against the reference: outputs and dq, dk, dv.

On CPU everything runs in Pallas interpret mode (the Triton-target kernels through the generic
interpreter, the TPU-target kernels through the simulated-TPU interpreter, pltpu.InterpretParams),
which is slow, so shapes are tiny and blocks small (16) to get several blocks per axis: lengths of
37 / 45 are not block multiples, so padding and masking of the tail are exercised. Tolerances:
float32 1e-4 (abs and rel; observed errors ~1e-6); bfloat16 5e-2 abs+rel against the float32
reference of the same (bf16-rounded) inputs (observed ~2e-2), since p and ds are rounded to bf16
before the matmuls.

`-m slow` adds bigger interpret cases (TPU target with several 128-wide kv blocks); `-m gpu` / `-m tpu`
run the compiled kernels on the device at realistic shapes.
"""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altbench.kernels import attention
from altbench.kernels import flash_attention as fa

GPU_SMALL = fa.BlockSizes(16, 16, 16, 16, 16, 16)
GPU_MIXED = fa.BlockSizes(32, 16, 16, 32, 32, 16)      # fwd / dkdv / dq tiles differ
TPU_SMALL = fa.BlockSizes(16, 128, 16, 128, 16, 128)   # kv tiles are lane-wide (128) on TPU
F32_TOL = dict(rtol=1e-4, atol=1e-4)
BF16_TOL = dict(rtol=5e-2, atol=5e-2)


def _inputs(b, t, s, h, hk, d, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (b, t, h, d)).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, hk, d)).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, hk, d)).astype(dtype)
  seg = jnp.cumsum(jax.random.bernoulli(ks[3], 0.08, (b, t)), axis=1).astype(jnp.int32)
  cot = jax.random.normal(ks[4], (b, t, h, d))
  return q, k, v, seg, cot


@jax.jit(static_argnums=0)
def _value_and_grads(fn, q, k, v, cot):
  # One program for output and gradients: interpret-mode compiles dominate the test time.
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(cot.astype(out.dtype))


def _compare(flash_fn, q, k, v, cot, causal, segment_ids, tol, softmax_scale=None):
  f32 = lambda x: x.astype(jnp.float32)
  ref_fn = lambda q, k, v: attention(f32(q), f32(k), f32(v), causal=causal, segment_ids=segment_ids,
                                     softmax_scale=softmax_scale, impl="reference")
  out, grads = _value_and_grads(flash_fn, q, k, v, cot)
  with jax.default_matmul_precision("highest"):  # on a GPU/TPU the f32 reference would use TF32/bf16
    ref_out, ref_grads = _value_and_grads(ref_fn, q, k, v, cot)
  assert out.dtype == q.dtype
  np.testing.assert_allclose(f32(out), ref_out, **tol, err_msg="output")
  for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert g.dtype == q.dtype and g.shape == r.shape
    np.testing.assert_allclose(f32(g), f32(r), **tol, err_msg=name)


# Each case is one interpret-mode compile (~4 s): the fast set covers causal / non-causal, segment
# ids, GQA 2 and 1 (MQA), a tail block, differing fwd / bwd tiles, bf16, and the TPU kernels.
# gpu-pad-keys-mixedblocks: keys padded to the dkv tile (32) span two forward tiles (16), the first
# only partly pad; only causal masks or segment ids hid them before (found on an H100: 4% off).
@pytest.mark.parametrize("target,blocks,t,h,hk,causal,use_seg,dtype", [
    ("gpu", GPU_MIXED, 37, 4, 2, True, False, jnp.float32),
    ("gpu", GPU_SMALL, 37, 4, 1, False, True, jnp.float32),
    ("gpu", GPU_MIXED, 37, 4, 2, False, False, jnp.float32),
    ("gpu", GPU_SMALL, 37, 4, 2, True, True, jnp.bfloat16),
    ("tpu", TPU_SMALL, 37, 4, 2, True, True, jnp.float32),
    pytest.param("gpu", GPU_MIXED, 45, 4, 2, True, True, jnp.float32, marks=pytest.mark.slow),
    pytest.param("gpu", GPU_SMALL, 37, 4, 1, True, True, jnp.bfloat16, marks=pytest.mark.slow),
], ids=["gpu-causal-gqa2-mixedblocks", "gpu-seg-mqa", "gpu-pad-keys-mixedblocks", "gpu-bf16-causal-seg",
        "tpu-causal-seg-gqa2", "gpu-causal-seg-mixedblocks", "gpu-bf16-mqa"])
def test_matches_reference(target, blocks, t, h, hk, causal, use_seg, dtype):
  q, k, v, seg, cot = _inputs(2, t, t, h, hk, 16, dtype=dtype)
  seg = seg if use_seg else None
  fn = lambda q, k, v: fa.flash_attention(q, k, v, causal=causal, segment_ids=seg, target=target,
                                          block_sizes=blocks)
  _compare(fn, q, k, v, cot, causal, seg, F32_TOL if dtype == jnp.float32 else BF16_TOL)


@pytest.mark.parametrize("target,blocks", [
    ("gpu", GPU_SMALL), pytest.param("tpu", TPU_SMALL, marks=pytest.mark.slow)])
def test_kv_cache_style_ids_with_an_empty_row(target, blocks):
  # (q_ids, kv_ids) with T != S, the last 5 keys invisible to all, and query 0 seeing no key at all:
  # the reference gives that row the uniform average of all keys, and so must the kernel (its dv
  # share is 1/S of do; a log-sum-exp residual of ~-2.4e38 + log2(S) would lose the 1/S).
  q, k, v, _, cot = _inputs(2, 20, 45, 4, 2, 16, seed=1)
  q_ids = jnp.ones((2, 20), jnp.int32).at[:, 0].set(7)
  kv_ids = jnp.broadcast_to((jnp.arange(45) < 40).astype(jnp.int32), (2, 45))
  fn = lambda q, k, v: fa.flash_attention(q, k, v, causal=False, segment_ids=(q_ids, kv_ids),
                                          target=target, block_sizes=blocks)
  _compare(fn, q, k, v, cot, False, (q_ids, kv_ids), F32_TOL)


def test_dispatch_pallas_with_scale_and_odd_head_dim():
  # Through kernels.attention: default (clamped) block table, softmax_scale, head_dim 24 (the GPU
  # target pads it to 32 internally), and a pallas_call really is in the program.
  q, k, v, seg, cot = _inputs(1, 21, 21, 2, 1, 24, seed=2)
  fn = lambda q, k, v: attention(q, k, v, causal=True, segment_ids=seg, softmax_scale=0.3, impl="pallas")
  assert "pallas_call" in str(jax.make_jaxpr(fn)(q, k, v))
  _compare(fn, q, k, v, cot, True, seg, F32_TOL, softmax_scale=0.3)


def test_dense_mask_unsupported_and_auto_dispatch(monkeypatch):
  q, k, v, _, _ = _inputs(1, 8, 8, 2, 2, 16)
  mask = jnp.tril(jnp.ones((8, 8), bool))
  with pytest.raises(NotImplementedError, match="dense `mask`"):
    attention(q, k, v, causal=False, mask=mask, impl="pallas")
  attention_module = importlib.import_module("altbench.kernels.attention")  # kernels.attention is the function
  monkeypatch.delenv("ALTBENCH_ATTENTION_AUTO", raising=False)
  shape = lambda tq: (1, tq, 2, 64)
  pick = lambda tq, m=None, dtype=jnp.bfloat16: attention_module._auto_impl(shape(tq), shape(tq), m, dtype)
  if jax.default_backend() == "cpu":
    assert pick(128) == "xla"                                    # CPU default stays xla
  monkeypatch.setattr(fa, "backend_target", lambda backend=None: "gpu")
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  assert pick(128) == "pallas"
  assert pick(128, dtype=jnp.float32) == "xla"                   # float32 on GPU: off the tensor cores
  assert pick(128, mask) == "xla"                                # dense mask -> xla fallback
  assert pick(1) == "xla"                                        # decode step
  monkeypatch.setattr(jax, "device_count", lambda *a: 8)
  assert pick(128) == "xla"                                      # sharded: not partitionable
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.setenv("ALTBENCH_ATTENTION_AUTO", "xla")
  assert pick(128) == "xla"


@pytest.mark.slow
@pytest.mark.parametrize("causal,use_seg", [(True, False), (False, True), (True, True)])
def test_tpu_kernels_several_kv_blocks(causal, use_seg):
  # 300 keys in 128-wide tiles: three kv blocks, the causal skip (pl.when + clamped index maps),
  # the dk/dv grid walking groups * q blocks, and head_dim 16 < 128 (lane slicing).
  q, k, v, seg, cot = _inputs(1, 300, 300, 4, 2, 16, seed=3)
  seg = seg if use_seg else None
  blocks = fa.BlockSizes(64, 128, 32, 128, 64, 128)
  fn = lambda q, k, v: fa.flash_attention(q, k, v, causal=causal, segment_ids=seg, target="tpu",
                                          block_sizes=blocks)
  _compare(fn, q, k, v, cot, causal, seg, F32_TOL)


def test_tpu_pad_keys_in_more_than_the_last_block():
  # The dkv tile (256) pads 300 keys to 512: forward / dq tiles of 128 hold pad keys in blocks 2 and 3.
  q, k, v, _, cot = _inputs(1, 300, 300, 2, 1, 16, seed=6)
  fn = lambda q, k, v: fa.flash_attention(q, k, v, causal=False, target="tpu",
                                          block_sizes=fa.BlockSizes(64, 128, 64, 256, 64, 128))
  _compare(fn, q, k, v, cot, False, None, F32_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("hk,causal,use_seg", [(1, True, True), (4, False, False), (2, False, True)])
def test_gpu_kernels_bigger(hk, causal, use_seg):
  q, k, v, seg, cot = _inputs(2, 130, 130, 4, hk, 64, seed=4)
  seg = seg if use_seg else None
  fn = lambda q, k, v: fa.flash_attention(q, k, v, causal=causal, segment_ids=seg, target="gpu",
                                          block_sizes=fa.BlockSizes(32, 64, 16, 32, 64, 16))
  _compare(fn, q, k, v, cot, causal, seg, F32_TOL)


# ---- compiled kernels on a device (opt-in: -m gpu / -m tpu) -------------------------------------

_DEVICE_CASES = [  # (b, L, h, hk, d, causal, use_seg, dtype)
    (2, 1024, 8, 2, 64, True, False, jnp.bfloat16),
    (2, 1000, 8, 8, 128, True, True, jnp.bfloat16),
    (1, 2048, 4, 1, 128, False, True, jnp.bfloat16),
    (2, 777, 4, 2, 64, False, False, jnp.float32),
    (1, 512, 4, 2, 96, True, False, jnp.bfloat16),
]


def _device_case(target, b, length, h, hk, d, causal, use_seg, dtype):
  q, k, v, seg, cot = _inputs(b, length, length, h, hk, d, seed=5, dtype=dtype)
  seg = seg if use_seg else None
  fn = lambda q, k, v: attention(q, k, v, causal=causal, segment_ids=seg, impl="pallas")
  assert "pallas_call" in str(jax.make_jaxpr(fn)(q, k, v))
  _compare(fn, q, k, v, cot, causal, seg, F32_TOL if dtype == jnp.float32 else BF16_TOL)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("case", _DEVICE_CASES)
def test_gpu_compiled_matches_reference(case):
  _device_case("gpu", *case)


@pytest.mark.tpu
@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("case", _DEVICE_CASES[:3])
def test_tpu_compiled_matches_reference(case):
  _device_case("tpu", *case)


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_lowers(target):
  # Forward + backward lowered for the real backend without a device (Pallas -> Triton IR for CUDA, Mosaic MLIR
  # for TPU): each backend module's kernels are reached through the one custom_vjp. bf16, grouped KV, documents,
  # causal, lengths that are not block multiples.
  q, k, v, seg, _ = _inputs(1, 300, 300, 4, 2, 64, dtype=jnp.bfloat16)

  def loss(q, k, v):
    out = fa.flash_attention(q, k, v, causal=True, segment_ids=seg, target=target, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  platform = {"gpu": "cuda", "tpu": "tpu"}[target]
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=[platform],
                               disabled_checks=checks)(q, k, v)
  found = set(re.findall(r"altbench_flash_[a-z_]+", exported.mlir_module()))
  suffix = "" if target == "gpu" else "_tpu"
  assert {f"altbench_flash_{n}{suffix}" for n in ("fwd", "dq", "dkdv")} <= found, found
