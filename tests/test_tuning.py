"""The kernel block-size table: deterministic choice, atomic merge, and dispatch that follows the table."""

import importlib
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altbench import kernels
from altbench.kernels import flash_attention, ssd_pallas, tuning

# kernels.attention / kernels.ssd are the public functions; their modules hold the dispatch details.
attention_mod = importlib.import_module("altbench.kernels.attention")
ssd = importlib.import_module("altbench.kernels.ssd")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def table(tmp_path, monkeypatch):
  path = str(tmp_path / "blocks.json")
  monkeypatch.setenv(tuning.TABLE_ENV, path)
  return path


def test_choose_first_within_tolerance_and_skips_failures():
  cands = ["a", "b", "c", "d"]
  assert tuning.choose(cands, [10.0, 9.0, 9.1, 20.0], tolerance=0.0) == 1
  assert tuning.choose(cands, [10.0, 9.0, 9.1, 20.0], tolerance=0.2) == 0  # 10 <= 1.2 * 9: the first wins
  assert tuning.choose(cands, [None, 9.0, 8.0, None], tolerance=0.03) == 2
  with pytest.raises(RuntimeError, match="every candidate failed"):
    tuning.choose(cands, [None] * 4)


def test_write_merges_and_bad_table_names_the_file(table):
  tuning.write_entries({tuning.key("ssd_xla", "cpu", "p64n64"): {"cpu_block_bytes": 1}})
  tuning.write_entries({tuning.key("attention_xla", "cpu", "d64"): {"causal_block": 32}})
  assert json.load(open(table)) == {"ssd_xla|cpu|p64n64": {"cpu_block_bytes": 1},
                                    "attention_xla|cpu|d64": {"causal_block": 32}}
  assert tuning.lookup("attention_xla", "d64", kind="cpu") == {"causal_block": 32}
  assert tuning.lookup("attention_xla", "d64", kind="TPU v5 lite") is None
  with open(table, "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="blocks.json"):
    tuning.lookup("attention_xla", "d64")


def _dots(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_causal_xla_block_follows_the_table(table):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 64)), jnp.float32) for _ in range(3))
  # A new function per trace: the table is read at trace time and jax caches traces per function.
  attn = lambda: lambda q, k, v: kernels.attention(q, k, v, causal=True, impl="xla")
  ref = kernels.attention(q, k, v, causal=True, impl="reference")
  assert _dots(attn(), q, k, v) == 2 * 256 // attention_mod.CAUSAL_BLOCK  # two matmuls per query block
  tuning.write_entries({tuning.key("attention_xla", tuning.device_kind(), "d64"): {"causal_block": 128}})
  assert _dots(attn(), q, k, v) == 2 * 256 // 128
  np.testing.assert_allclose(jax.jit(attn())(q, k, v), ref, atol=2e-5)


def test_ssd_cpu_block_and_pallas_defaults_follow_the_table(table):
  assert ssd._chunks_per_block(2, 4, 64, 32, 64, 64) == ssd._CPU_BLOCK_BYTES // (2 * 4 * 64 * 64 * 4)
  kind = tuning.device_kind()
  tuning.write_entries({
      tuning.key("ssd_xla", kind, tuning.ssd_class(64, 64)): {"cpu_block_bytes": 4 * 2 * 4 * 64 * 64 * 4},
      tuning.key("ssd_pallas", kind, tuning.ssd_class(64, 128)): {"block_m": 32, "block_k": 16, "block_p": 16,
                                                                        "heads": 2, "num_warps": 8, "num_stages": 3},
      tuning.key("flash_attention", kind, "d128"): {"block_q": 32, "block_k": 32, "block_q_dkv": 16,
                                                   "block_k_dkv": 32, "block_q_dq": 32, "block_k_dq": 16}})
  assert ssd._chunks_per_block(2, 4, 64, 32, 64, 64) == 4
  assert ssd._chunks_per_block(2, 4, 64, 32, 32, 32) == ssd._CPU_BLOCK_BYTES // (2 * 4 * 64 * 64 * 4)  # other class
  bs = ssd_pallas.default_block_sizes("gpu", 64, 8, 64, 128)
  assert (bs.block_m, bs.block_k, bs.block_p, bs.heads, bs.num_warps, bs.num_stages) == (32, 16, 16, 2, 8, 3)
  other = ssd_pallas.default_block_sizes("gpu", 64, 8, 64, 64)  # another shape class keeps the hand default
  assert (other.block_m, other.num_warps) == (ssd_pallas._GPU_DEFAULT.block_m, ssd_pallas._GPU_DEFAULT.num_warps)
  assert flash_attention.default_block_sizes("gpu", 128).block_q == 32
  assert flash_attention.default_block_sizes("gpu", 64) == flash_attention._BLOCKS[("gpu", 64)]


def test_tune_command_writes_the_measured_choice(table, capsys):
  spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "experiments/bench/kernels.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  chosen = bench.main(["--quick", "--reps", "1", "--tune", "--table", table])
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  timed = [l for l in lines if "params" in l]
  assert {l["op"] for l in timed} == {"attention_xla", "ssd_xla"} and all(l["ms"] > 0 for l in timed)
  for summary in (l for l in lines if "chosen" in l):
    mine = [l for l in timed if l["op"] == summary["op"]]
    best = min(l["ms"] for l in mine)
    first_ok = next(l for l in mine if l["ms"] <= best * 1.03)
    assert summary["chosen"] == first_ok["params"]
  assert json.load(open(table)) == chosen and len(chosen) == 2


def test_forced_impl_names_the_variable_and_the_valid_values(monkeypatch):
  monkeypatch.setenv("ALTBENCH_SSD_AUTO", "triton")
  with pytest.raises(ValueError, match=r"ALTBENCH_SSD_AUTO='triton'.*xla, pallas, reference"):
    tuning.forced_impl("ALTBENCH_SSD_AUTO")
  monkeypatch.setenv("ALTBENCH_ATTENTION_AUTO", "cudnn")  # attention has a fourth impl; the SSD has not
  assert tuning.forced_impl("ALTBENCH_ATTENTION_AUTO", ("xla", "pallas", "reference", "cudnn")) == "cudnn"
  with pytest.raises(ValueError, match="cudnn"):
    tuning.forced_impl("ALTBENCH_ATTENTION_AUTO")
  monkeypatch.setenv("ALTBENCH_SSD_AUTO", "reference")
  assert tuning.forced_impl("ALTBENCH_SSD_AUTO") == "reference"
  monkeypatch.delenv("ALTBENCH_SSD_AUTO")
  assert tuning.forced_impl("ALTBENCH_SSD_AUTO") == ""
