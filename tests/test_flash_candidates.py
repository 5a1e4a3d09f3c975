"""Issue 26's flash attention candidates (BlockSizes options, GPU kernels) against the reference.

Each option (per-kernel launch parameters, one log-sum-exp vector, k pre-scaled by scale * log2(e), the
one-kernel backward with dq by atomic adds) runs in Pallas interpret mode on the "gpu" target and is
compared with the float32 reference: output and dq, dk, dv, causal and not, with segment ids, lengths that
are not block multiples (37, 45), grouped KV heads. The fast set runs the options together along the two
backward paths (three kernels; fused); `-m slow` runs each option alone. Launch parameters do nothing in
interpret mode, so they are checked where they act: in the Triton calls of a program lowered for CUDA.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from test_flash_attention import BF16_TOL, F32_TOL, GPU_MIXED, _compare, _inputs

from altbench.kernels import flash_attention as fa

THREE_KERNELS = dict(one_lse=True, prescale_k=True, num_warps_dq=8, num_stages_dq=1)
FUSED = dict(fused_bwd=True, one_lse=True, prescale_k=True)
ALONE = {"one_lse": dict(one_lse=True), "prescale_k": dict(prescale_k=True), "fused_bwd": dict(fused_bwd=True)}


def _check(options, t, causal, use_seg, dtype=jnp.float32, d=16, blocks=GPU_MIXED, seed=0):
  q, k, v, seg, cot = _inputs(2, t, t, 4, 2, d, seed=seed, dtype=dtype)
  seg = seg if use_seg else None
  bs = dataclasses.replace(blocks, **options)
  fn = lambda q, k, v: fa.flash_attention(q, k, v, causal=causal, segment_ids=seg, target="gpu", block_sizes=bs)
  _compare(fn, q, k, v, cot, causal, seg, F32_TOL if dtype == jnp.float32 else BF16_TOL)


# gpu-fused-pad-keys: 37 keys padded to 64 by the 32-wide dkv tile, no causal mask or ids to hide them: the
# fused kernel must mask pad keys out of dq itself.
@pytest.mark.parametrize("options,causal,use_seg", [
    (THREE_KERNELS, True, True), (FUSED, False, False),
    pytest.param(FUSED, True, True, marks=pytest.mark.slow),
    pytest.param(THREE_KERNELS, False, False, marks=pytest.mark.slow),
], ids=["three-kernels-causal-seg", "fused-pad-keys", "fused-causal-seg", "three-kernels-pad-keys"])
def test_options_together_match_reference(options, causal, use_seg):
  _check(options, 37, causal, use_seg)


def test_empty_row_with_one_lse_and_fused_backward():
  # (q_ids, kv_ids) with query 0 seeing no key: one_lse falls back to two terms there (m + log2 l would
  # round to m and the row's dv share would come out S times too large), and the fused kernel's atomic
  # dq must stay zero for that row while pad and invisible keys add nothing.
  q, k, v, _, cot = _inputs(2, 20, 45, 4, 2, 16, seed=1)
  q_ids = jnp.ones((2, 20), jnp.int32).at[:, 0].set(7)
  kv_ids = jnp.broadcast_to((jnp.arange(45) < 40).astype(jnp.int32), (2, 45))
  bs = dataclasses.replace(GPU_MIXED, **FUSED)
  fn = lambda q, k, v: fa.flash_attention(q, k, v, causal=False, segment_ids=(q_ids, kv_ids), target="gpu",
                                          block_sizes=bs)
  _compare(fn, q, k, v, cot, False, (q_ids, kv_ids), F32_TOL)


def _pallas_calls(options, segment_ids=None):
  """{kernel name: number of outputs} of the pallas_calls in the forward + backward program."""
  q, k, v, seg, cot = _inputs(1, 32, 32, 2, 1, 16)
  bs = dataclasses.replace(GPU_MIXED, **options)
  fn = lambda q, k, v: fa.flash_attention(q, k, v, causal=True, segment_ids=segment_ids, target="gpu",
                                          block_sizes=bs)
  jaxpr = jax.make_jaxpr(lambda q, k, v: jax.vjp(fn, q, k, v)[1](cot))(q, k, v)
  calls = {}

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "pallas_call":
        name = eqn.params.get("name") or eqn.params.get("name_and_src_info")  # jax 0.10 / older
        calls[str(getattr(name, "name", name))] = len(eqn.outvars)
      for p in eqn.params.values():
        if hasattr(p, "eqns") or hasattr(p, "jaxpr"):
          walk(getattr(p, "jaxpr", p))

  walk(jaxpr.jaxpr)
  return calls


def test_options_change_the_program_and_defaults_do_not():
  # Defaults are the kernels as they were: three kernels, the forward saving m and log2 l. Each option
  # really is taken: one vector saved, the dq kernel gone; one_lse off where a row can see no key.
  assert _pallas_calls({}) == {"altbench_flash_fwd": 3, "altbench_flash_dq": 1, "altbench_flash_dkdv": 2}
  assert _pallas_calls(dict(one_lse=True))["altbench_flash_fwd"] == 2
  ids = (jnp.ones((1, 32), jnp.int32), jnp.ones((1, 32), jnp.int32))
  assert _pallas_calls(dict(one_lse=True), segment_ids=ids)["altbench_flash_fwd"] == 3
  assert _pallas_calls(dict(fused_bwd=True)) == {"altbench_flash_fwd": 3, "altbench_flash_bwd_fused": 3}
  bs = fa.BlockSizes(128, 64, 32, 128, 128, 32)
  assert (bs.num_warps_dkdv, bs.num_warps_dq, bs.one_lse, bs.prescale_k, bs.fused_bwd) == (None, None, False,
                                                                                          False, False)


def _lowered_launches(options, causal=True, use_seg=True, d=64):
  """{Triton kernel name: (num_warps, num_stages)} of forward + backward lowered for CUDA (no device)."""
  q, k, v, seg, _ = _inputs(1, 300, 300, 4, 2, d, dtype=jnp.bfloat16)
  seg = seg if use_seg else None
  bs = dataclasses.replace(fa.default_block_sizes("gpu", d), **options)

  def loss(q, k, v):
    out = fa.flash_attention(q, k, v, causal=causal, segment_ids=seg, target="gpu", interpret=False,
                             block_sizes=bs)
    return jnp.sum(out.astype(jnp.float32))

  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                               disabled_checks=checks)(q, k, v)
  found = re.findall(r'name = "(altbench_flash_\w+)", num_stages = (\d+) : i32, num_warps = (\d+)',
                     exported.mlir_module())
  return {name: (int(w), int(s)) for name, s, w in found}


def test_lowers_for_cuda_with_per_kernel_launches():
  # The three-kernel path with one_lse and prescale_k, each kernel with its own warps / stages (the d64
  # default is 4 warps, 3 stages), and the fused backward (Triton atomic adds) with the dk/dv launch.
  launches = _lowered_launches(dict(one_lse=True, prescale_k=True, num_warps_dq=8, num_stages_dq=2,
                                    num_warps_dkdv=8, num_stages_dkdv=1))
  assert launches == {"altbench_flash_fwd": (4, 3), "altbench_flash_dq": (8, 2), "altbench_flash_dkdv": (8, 1)}
  launches = _lowered_launches(dict(FUSED, num_warps_dkdv=8), causal=False)
  assert launches == {"altbench_flash_fwd": (4, 3), "altbench_flash_bwd_fused": (8, 3)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ALONE))
@pytest.mark.parametrize("causal,use_seg,t", [(True, True, 37), (False, True, 45), (True, False, 45)])
def test_each_option_alone_matches_reference(name, causal, use_seg, t):
  _check(ALONE[name], t, causal, use_seg)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ALONE))
def test_each_option_alone_bf16(name):
  _check(ALONE[name], 37, True, True, dtype=jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("causal,use_seg", [(True, False), (False, True)])
def test_fused_backward_bigger(causal, use_seg):
  # Several q blocks per kv block, head_dim 64, GQA: many programs adding into one dq row block.
  _check(FUSED, 130, causal, use_seg, d=64, blocks=fa.BlockSizes(32, 64, 16, 32, 64, 16), seed=4)


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("name", ["one_lse", "prescale_k", "fused_bwd"])
def test_each_option_alone_lowers_for_cuda(name, d):
  launches = _lowered_launches(ALONE[name], causal=name != "fused_bwd", d=d)
  kernels = {"altbench_flash_fwd", "altbench_flash_bwd_fused"} if name == "fused_bwd" else {
      "altbench_flash_fwd", "altbench_flash_dq", "altbench_flash_dkdv"}
  assert set(launches) == kernels


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128])
def test_every_candidate_of_the_bench_lowers_for_cuda(d):
  for name, options in fa.GPU_CANDIDATES[d].items():
    assert _lowered_launches(options, d=d), name
