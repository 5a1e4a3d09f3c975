"""The Pallas kernels under a multi-device mesh: shard_map over the batch axes, same numbers as one device.

`test_eight_devices_match_one_device` runs this file as a script in a subprocess with 8 simulated CPU
devices (the device count is fixed when JAX starts) and impl="pallas" (interpret mode), under
`jax.set_mesh` of train/mesh.py's ("data", "fsdp") mesh:
  * a hybrid "MGA" LM (Mamba-2, Gated DeltaNet, attention; packed documents so every kernel sees segment ids), its
    parameters sharded as training shards them (fsdp=4) and the batch of 8 split over all 8 devices:
    loss and every parameter gradient against the same model on one device without a mesh;
  * the two ops alone on a batch of 4, which "fsdp" (4) cannot split after "data" (2): shard_map splits it
    over "data" only and each fsdp group computes its slice redundantly; attention with GQA and a
    (q_ids, kv_ids) pair, SSD with every optional input and final_states; gradients w.r.t. every input,
    the replicated A, D and dt_bias included (their per-device gradients must be summed, and the
    cotangents of the fsdp-replicated outputs must not be counted 4 times);
  * the traced programs: every pallas_call sits inside a shard_map and sees the per-device batch, so a
    dispatch that left the kernels to GSPMD (same numbers, replicated work) fails too.
Tolerance: float32, |err| <= 1e-5 * max|ref| per tensor (the sharded program only sums the replicated
gradients and the loss in another order; observed ~1e-7..2e-6).

`test_lowers_under_mesh` exports forward + backward for CUDA and TPU under an abstract 8-device mesh
(jax.sharding.use_abstract_mesh: no devices needed) with kernels.attention / kernels.ssd at impl="auto"
on a pretended GPU/TPU backend: auto must pick the kernels there (it fell back to XLA on several devices
before) and the kernels must sit in an sdy.manual_computation with per-device shapes.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

RTOL = 1e-5
N_DEVICES = 8


# --------------------------------------------------------------------------------------------
# The subprocess (8 simulated devices)


def _pallas_calls(jaxpr, inside=False, found=None):
  """[(inside a shard_map, first operand's shape)] of every pallas_call in a (closed) jaxpr, recursively."""
  import jax.extend
  found = [] if found is None else found
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found.append((inside, tuple(eqn.invars[0].aval.shape)))
      continue
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          _pallas_calls(sub, inside or eqn.primitive.name == "shard_map", found)
  return found


def _model_case(mesh):
  """Loss and parameter gradients of a tiny "MA" LM on one device and under `mesh`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from altbench.archs import lm
  from altbench.train import mesh as mesh_lib

  cfg = lm.Config(pattern="MGA", d_model=32, n_heads=2, vocab_size=64, d_ff=64, d_state=16, ssm_headdim=16,
                  chunk_size=16, attn_impl="pallas", ssm_impl="pallas", gdn_impl="pallas")
  graphdef, params, rest = nnx.split(lm.build(cfg, nnx.Rngs(0)), nnx.Param, ...)
  rng = np.random.default_rng(0)
  b, length = 8, 32
  tokens = rng.integers(0, 64, (b, length + 1))
  docs = np.cumsum(rng.random((b, length)) < 0.1, axis=1).astype(np.int32)
  batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
           "loss_mask": jnp.ones((b, length), jnp.float32), "nbytes": jnp.ones((b, length), jnp.float32),
           "segment_ids": jnp.asarray(docs)}

  def loss(params, batch):
    return lm.loss(nnx.merge(graphdef, params, rest), batch, None)[0]

  grad_fn = jax.value_and_grad(loss)
  ref_loss, ref_grads = jax.jit(grad_fn)(params, batch)
  params8 = jax.device_put(params, mesh_lib.state_shardings(mesh, params))
  batch8 = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    loss8, grads8 = jax.jit(grad_fn)(params8, batch8)
    calls = _pallas_calls(jax.make_jaxpr(grad_fn)(params8, batch8))
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return {"loss": (float(ref_loss), float(loss8)), "grads": (flat(ref_grads), flat(grads8)), "calls": calls}


def _ops_case(mesh):
  """Outputs and input gradients of kernels.attention and kernels.ssd (impl="pallas") on a batch of 4."""
  import importlib

  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from altbench.kernels import attention

  ssd = importlib.import_module("altbench.kernels.ssd").ssd
  rng = np.random.default_rng(1)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  b, t, h, hk, d = 4, 24, 4, 2, 16
  q_ids = jnp.asarray(np.cumsum(rng.random((b, t)) < 0.15, axis=1), jnp.int32)
  att_args = (normal(b, t, h, d), normal(b, t, hk, d), normal(b, t, hk, d))
  att_cot = normal(b, t, h, d)

  def att_loss(q, k, v):
    out = attention(q, k, v, causal=True, segment_ids=(q_ids, q_ids), impl="pallas")
    return jnp.sum(out * att_cot)

  l, sh, g, p, n = 40, 4, 2, 8, 8
  seq_idx = jnp.asarray(np.cumsum(rng.random((b, l)) < 0.05, axis=1), jnp.int32)
  ssd_args = (normal(b, l, sh, p), normal(b, l, sh), -jnp.exp(normal(sh)), 0.5 * normal(b, l, g, n),
              0.5 * normal(b, l, g, n), normal(sh, p), normal(b, l, sh, p), 0.5 * normal(sh), 0.5 * normal(b, sh, p, n))
  y_cot, f_cot = normal(b, l, sh, p), normal(b, sh, p, n)

  def ssd_loss(x, dt, A, B, C, D, z, dt_bias, h0):
    y, final = ssd(x, dt, A, B, C, 16, D=D, z=z, dt_bias=dt_bias, initial_states=h0, seq_idx=seq_idx,
                   dt_softplus=True, return_final_states=True, impl="pallas")
    return jnp.sum(y * y_cot) + jnp.sum(final * f_cot)

  out = {}
  for name, fn, args in (("attention", att_loss, att_args), ("ssd", ssd_loss, ssd_args)):
    grad_fn = jax.value_and_grad(fn, argnums=tuple(range(len(args))))
    ref = jax.jit(grad_fn)(*args)
    # The batch split over "data" (fsdp cannot split 4 after data's 2), parameters replicated.
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P(*([None] * a.ndim))) if a.shape[0] != b
                                   else NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
      got = jax.jit(grad_fn)(*map(put, args))
      calls = _pallas_calls(jax.make_jaxpr(grad_fn)(*args))
    out[name] = {"value": (float(ref[0]), float(got[0])),
                 "grads": ([np.asarray(x) for x in ref[1]], [np.asarray(x) for x in got[1]]), "calls": calls}
  return out


def _worker(out_path):
  import pickle

  import jax

  from altbench.train import mesh as mesh_lib
  from altbench.train.config import MeshConfig

  assert jax.device_count() == N_DEVICES, jax.devices()
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=4))
  result = {"model": _model_case(mesh), **_ops_case(mesh)}
  with open(out_path, "wb") as f:
    pickle.dump(result, f)


# --------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  import pickle
  out = tmp_path_factory.mktemp("sharded") / "result.pkl"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={N_DEVICES}"])
  for var in ("ALTBENCH_ATTENTION_AUTO", "ALTBENCH_SSD_AUTO"):
    env.pop(var, None)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  with open(out, "rb") as f:
    return pickle.load(f)


def _assert_per_device(calls, per_device_batch, what):
  assert calls, f"{what}: no pallas_call traced (impl='pallas' did not reach the kernels)"
  outside = [shape for inside, shape in calls if not inside]
  assert not outside, f"{what}: pallas_calls outside shard_map (left to GSPMD): {outside}"
  # Every kernel operand here leads with the batch ((b, L, h, d), (b, chunks, ...), ...).
  assert {shape[0] for _, shape in calls} == {per_device_batch}, (what, calls)


def _assert_close(got, ref, what):
  """|got - ref| <= RTOL * max|ref| (norm-relative: the gradients span several orders of magnitude)."""
  ref, got = np.asarray(ref), np.asarray(got)
  scale = np.abs(ref).max()
  assert scale > 0, f"{what}: zero, the comparison would prove nothing"
  err = np.abs(got - ref).max()
  assert got.shape == ref.shape and err <= RTOL * scale, f"{what}: max |err| {err:.3g} > {RTOL} * {scale:.3g}"


def test_eight_devices_match_one_device_hybrid_model(sharded):
  model = sharded["model"]
  _assert_close(model["loss"][1], model["loss"][0], "loss")
  ref, got = model["grads"]
  assert set(ref) == set(got)
  assert any("A_log" in k for k in ref) and any("['q']" in k for k in ref), sorted(ref)
  for name in ref:
    _assert_close(got[name], ref[name], f"gradient {name}")
  # batch 8 over data x fsdp = 8 devices: one sequence per device
  _assert_per_device(model["calls"], 1, "hybrid model")


@pytest.mark.parametrize("op", ["attention", "ssd"])
def test_eight_devices_match_one_device_ops_batch_not_divisible(sharded, op):
  case = sharded[op]
  _assert_close(case["value"][1], case["value"][0], f"{op} loss")
  for i, (r, g) in enumerate(zip(*case["grads"])):
    _assert_close(g, r, f"{op} gradient of input {i}")
  # batch 4: split over "data" (2) only, 2 sequences per device
  _assert_per_device(case["calls"], 2, op)


# --------------------------------------------------------------------------------------------
# Lowering for CUDA / TPU under an abstract 8-device mesh (in this process: no devices needed)


def _abstract_mesh():
  from jax.sharding import AbstractMesh, AxisType
  return AbstractMesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


@pytest.fixture
def pretend_backend(monkeypatch):
  """jax.default_backend() as the kernels see it: pretend a GPU or TPU (they pick target and interpret from it)."""
  import jax

  def pretend(backend, device_count=None):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    if device_count:
      monkeypatch.setattr(jax, "device_count", lambda *a, **k: device_count)
  return pretend


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_lowers_under_mesh(target, pretend_backend):
  import importlib

  import jax
  import jax.numpy as jnp

  from altbench.kernels import attention

  ssd = importlib.import_module("altbench.kernels.ssd").ssd
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  pretend_backend(target)
  mesh = _abstract_mesh()
  b, length, bf16 = 8, 128, jnp.bfloat16
  # Laid out as training lays out activations: the batch over ("data", "fsdp"), parameters replicated.
  spec = lambda shape: P(("data", "fsdp")) if shape[0] == b else P()
  sds = lambda *shape, dtype=bf16: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec(shape)))
  args = (sds(b, length, 4, 64), sds(b, length, 2, 64), sds(b, length, 2, 64),          # q, k, v
          sds(b, length, dtype=jnp.int32),                                               # segment ids
          sds(b, length, 4, 32), sds(b, length, 4), sds(4, dtype=jnp.float32),          # x, dt, A
          sds(b, length, 1, 32), sds(b, length, 1, 32), sds(4, dtype=jnp.float32))       # B, C, dt_bias

  def loss(q, k, v, seg, x, dt, A, B, C, dt_bias):
    att = attention(q, k, v, causal=True, segment_ids=seg, impl="auto")
    y = ssd(x, dt, A, B, C, 64, dt_bias=dt_bias, seq_idx=seg, dt_softplus=True, impl="auto")
    return jnp.sum(att.astype(jnp.float32)) + jnp.sum(y.astype(jnp.float32))

  diff = tuple(i for i in range(10) if i != 3)
  platform = {"gpu": "cuda", "tpu": "tpu"}[target]
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  with jax.sharding.use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=diff)), platforms=[platform],
                                 disabled_checks=checks)(*args)
  mlir = exported.mlir_module()
  assert exported.nr_devices == N_DEVICES
  assert "sdy.manual_computation" in mlir and '{"data", "fsdp"}' in mlir
  suffix = "" if target == "gpu" else "_tpu"
  names = set(re.findall(r"altbench_(?:flash|ssd)_[a-z_]+", mlir))
  # (the gradient of sum(y) does not need y: the SSD's forward scan kernel is dead code)
  expected = {f"altbench_flash_{n}{suffix}" for n in ("fwd", "dq", "dkdv")} | {f"altbench_ssd_state_pass{suffix}"}
  assert expected <= names, f"impl='auto' under a mesh on {target} must lower to the kernels; found {names}"
  # Every kernel launch sees the per-device batch (1 of 8), none the global one.
  call = "__gpu$xla.gpu.triton" if target == "gpu" else "tpu_custom_call"
  leading = [int(m) for line in mlir.splitlines() if f"@{call}(" in line
             for m in re.findall(r"-> \(?tensor<(\d+)x", line)[:1]]
  assert leading and set(leading) == {1}, f"leading (batch) dims of the {call} results: {leading}"


def test_auto_needs_a_mesh_on_several_devices(pretend_backend):
  # On a pretended 8-GPU host: a fused kernel under a mesh in context, xla without one (GSPMD would replicate
  # a bare pallas_call). Both ops.
  import importlib

  import jax
  import jax.numpy as jnp

  att = importlib.import_module("altbench.kernels.attention")
  ssd = importlib.import_module("altbench.kernels.ssd")
  pretend_backend("gpu", device_count=8)
  q_shape, bf16 = (8, 256, 4, 64), jnp.bfloat16
  assert att._auto_impl(q_shape, q_shape, None, bf16) == "xla"
  assert ssd._auto_impl(q_shape, (8, 256, 1, 64), bf16) == "xla"
  with jax.sharding.use_abstract_mesh(_abstract_mesh()):
    assert att._auto_impl(q_shape, q_shape, None, bf16) == "pallas"
    assert ssd._auto_impl(q_shape, (8, 256, 1, 64), bf16) == "pallas"


if __name__ == "__main__":
  _worker(sys.argv[1])
