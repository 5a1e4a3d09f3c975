"""convert-hf: tiny random Llama, Mamba-2 and Falcon-H1 models from transformers give the same logits and greedy
tokens once converted into a run directory, and unsupported config fields are refused by name."""

import copy
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="convert-hf tests compare against PyTorch transformers (pip install "
                                            "-e .[bench])")
transformers = pytest.importorskip("transformers",
                                   reason="convert-hf tests need transformers (pip install -e .[bench])")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from altbench.archs import lm  # noqa: E402
from altbench import cli  # noqa: E402
from altbench.train import convert_hf, loop  # noqa: E402

SEQ = 21  # not a multiple of the SSM chunk size (8)
NO_SPECIALS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
FALCON_MULTIPLIERS = dict(embedding_multiplier=1.7, lm_head_multiplier=0.6, key_multiplier=1.3,
                          attention_in_multiplier=0.8, attention_out_multiplier=1.2, ssm_in_multiplier=1.1,
                          ssm_out_multiplier=0.7, mlp_multipliers=[1.4, 0.9], ssm_multipliers=[0.5, 1.3, 0.8, 1.6, 0.7])


def _llama():
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24, intermediate_size=96,
      num_hidden_layers=2, vocab_size=300, rope_theta=5000.0, rms_norm_eps=1e-5, **NO_SPECIALS))


def _mamba2():
  return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
      hidden_size=64, num_heads=8, head_dim=16, expand=2, n_groups=2, state_size=16, conv_kernel=4, chunk_size=8,
      num_hidden_layers=2, vocab_size=300, layer_norm_epsilon=1e-3, tie_word_embeddings=True, **NO_SPECIALS))


def _falcon(**kw):
  base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
              num_hidden_layers=2, vocab_size=300, mamba_d_state=16, mamba_chunk_size=8, rope_theta=20000.0,
              **FALCON_MULTIPLIERS, **NO_SPECIALS)
  return transformers.FalconH1ForCausalLM(transformers.FalconH1Config(**{**base, **kw}))


MODELS = {
    "llama": _llama,
    "mamba2": _mamba2,
    # GQA, 2 SSM groups, an SSM width (96) that is no multiple of d_model, norm then gate.
    "falcon_h1": lambda: _falcon(mamba_d_ssm=96, mamba_n_heads=6, mamba_d_head=16, mamba_n_groups=2,
                                 mamba_rms_norm=True, mamba_norm_before_gate=True),
    # No gated RMSNorm (y * silu(z)), tied embeddings, width from mamba_expand.
    "falcon_h1_nonorm_tied": lambda: _falcon(mamba_d_ssm=None, mamba_expand=2, mamba_n_heads=8, mamba_d_head="auto",
                                             mamba_rms_norm=False, tie_word_embeddings=True),
    # Gate then norm, plain multi-head attention.
    "falcon_h1_gate_first": lambda: _falcon(num_key_value_heads=4, mamba_d_ssm=128, mamba_n_heads=8,
                                            mamba_n_groups=2, mamba_rms_norm=True, mamba_norm_before_gate=False),
}


def _randomize(model):
  """Weights far from transformers' init, so a default left in place (A_log, D, dt_bias, norm scales) shows."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("A_log"):
        p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=g)))
      elif name.endswith("dt_bias"):
        p.copy_(torch.randn(p.shape, generator=g) - 2)
      elif p.ndim == 1:  # norm scales, D, conv biases
        p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.15 * torch.randn(p.shape, generator=g))
  return model.eval()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("text") / "corpus.txt"
  path.write_text("def f(x):\n    return x + 1\n" * 40)
  return str(path)


def _run_overrides(text_file):
  """A small text dataset so load_run does not read the whole stdlib."""
  return [f"data.dataset=text:{text_file}", "data.seq_len=32", "data.eval_bytes=256", "train.batch_size=2"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, text_file):
  """name -> (hf model, run directory), built on first use."""
  cache = {}

  def get(name):
    if name not in cache:
      torch.manual_seed(0)
      model = _randomize(MODELS[name]())
      hf_dir = str(tmp_path_factory.mktemp(f"hf_{name}"))
      model.save_pretrained(hf_dir)
      run = str(tmp_path_factory.mktemp(f"run_{name}"))
      convert_hf.convert(hf_dir, run, _run_overrides(text_file), log=lambda *a: None)
      cache[name] = model, hf_dir, run
    return cache[name]

  return get


def _load(run):
  cfg, family, _, graphdef, state, _, step = loop.load_run(run)
  assert step == 0 and cfg.family == "lm"
  return nnx.merge(graphdef, state["params"], state["rest"])


def _ids(vocab, shape, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_converted_run_gives_hf_logits(converted, name):
  hf_model, _, run = converted(name)
  ids = _ids(300, (2, SEQ))
  with torch.no_grad():
    want = hf_model(torch.tensor(ids)).logits.numpy()
  got, _ = _load(run)(jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "falcon_h1"])
def test_greedy_generation_matches_hf(converted, name):
  hf_model, _, run = converted(name)
  prompt = _ids(300, (2, 7), seed=1)
  with torch.no_grad():
    want = hf_model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             max_new_tokens=6, do_sample=False).numpy()
  got = lm.generate(_load(run), prompt, 6, jax.random.key(0), temperature=0.0)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_config_maps_every_falcon_h1_field(converted):
  _, hf_dir, run = converted("falcon_h1")
  model = json.load(open(os.path.join(run, "config.json")))["config"]["model"]
  assert model["pattern"] == "PP" and model["n_kv_heads"] == 2 and model["ssm_inner_dim"] == 96
  ssm = (model["ssm_ngroups"], model["ssm_headdim"], model["norm_before_gate"], model["ssm_norm"])
  assert ssm == (2, 16, True, True)
  assert [model[f"ssm_{k}_multiplier"] for k in ("z", "x", "b", "c", "dt")] == [0.5, 1.3, 0.8, 1.6, 0.7]
  assert (model["mlp_gate_multiplier"], model["mlp_down_multiplier"], model["attn_key_multiplier"]) == (1.4, 0.9, 1.3)
  assert os.path.exists(os.path.join(run, "hf_config.json"))


def test_cli_converts_and_evaluates(converted, text_file, tmp_path, capsys):
  _, hf_dir, _ = converted("llama")
  run = str(tmp_path / "run")
  sets = [a for o in _run_overrides(text_file) for a in ("--set", o)]
  assert cli.main(["convert-hf", hf_dir, "--out", run, *sets]) == 0
  note = json.load(open(os.path.join(run, "config.json")))["converted_from"]
  assert note["architecture"] == "LlamaForCausalLM" and "tokenizer" in note
  assert cli.main(["eval", run]) == 0
  assert "'eval_bpb'" in capsys.readouterr().out
  assert cli.main(["convert-hf", hf_dir, "--out", run]) == 2  # never overwrites a run
  assert "already holds a run" in capsys.readouterr().err


def _hf_dir(tmp_path, model_fn, **changes):
  """A saved config.json with some fields changed (the config is refused before any weight is read)."""
  d = tmp_path / "hf"
  d.mkdir()
  cfg = json.loads(model_fn().config.to_json_string())
  cfg.update(changes)
  (d / "config.json").write_text(json.dumps(cfg))
  return str(d)


@pytest.mark.parametrize("model,changes,needle", [
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters.rope_type='linear'"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_parameters": None}, "rope_scaling="),
    ("llama", {"attention_bias": True}, "attention_bias=True"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("mamba2", {"time_step_limit": [0.001, 0.1]}, "time_step_limit=[0.001, 0.1]"),
    ("mamba2", {"rmsnorm": False}, "rmsnorm=False"),
    ("mamba2", {"use_bias": True}, "use_bias=True"),
    ("falcon_h1", {"projectors_bias": True}, "projectors_bias=True"),
    ("falcon_h1", {"ssm_multipliers": [1.0, 2.0]}, "ssm_multipliers=[1.0, 2.0]"),
    ("falcon_h1", {"architectures": ["FalconH1Model"]}, "architectures=['FalconH1Model']"),
])
def test_unsupported_fields_are_named(tmp_path, capsys, model, changes, needle):
  hf_dir = _hf_dir(tmp_path, MODELS[model], **changes)
  with pytest.raises(convert_hf.ConversionError) as err:
    convert_hf.convert(hf_dir, str(tmp_path / "run"), log=lambda *a: None)
  assert needle in str(err.value) and "valid" in str(err.value)
  assert cli.main(["convert-hf", hf_dir, "--out", str(tmp_path / "run2")]) == 2
  assert needle in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "run")


def test_tied_config_with_a_different_head_is_refused(converted, tmp_path):
  _, hf_dir, _ = converted("llama")
  d = tmp_path / "hf"
  d.mkdir()
  for f in os.listdir(hf_dir):
    (d / f).write_bytes(open(os.path.join(hf_dir, f), "rb").read())
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
  with pytest.raises(convert_hf.ConversionError, match="tie_word_embeddings=True, but lm_head.weight differs"):
    convert_hf.convert(str(d), str(tmp_path / "run"), log=lambda *a: None)


def test_sharded_and_bfloat16_checkpoints_read_the_same(converted, tmp_path):
  hf_model, hf_dir, _ = converted("llama")
  single = convert_hf.read_weights(hf_dir)
  hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
  sharded = convert_hf.read_weights(str(tmp_path / "sharded"))
  assert sorted(sharded) == sorted(single)
  for name, value in single.items():
    np.testing.assert_array_equal(sharded[name], value)
  copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # the fixture's model stays fp32
  bf16 = convert_hf.read_weights(str(tmp_path / "bf16"))
  for name, value in single.items():
    want = torch.from_numpy(np.array(value)).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(bf16[name], np.float32), want)


def _copy_of(hf_dir, d):
  d.mkdir()
  for f in os.listdir(hf_dir):
    (d / f).write_bytes(open(os.path.join(hf_dir, f), "rb").read())
  return d


def test_truncated_or_malformed_safetensors_is_a_one_line_error(converted, tmp_path, capsys):
  """Found by trying it: convert-hf on a truncated .safetensors died with a raw JSONDecodeError traceback."""
  _, hf_dir, _ = converted("llama")
  capsys.readouterr()  # the fixture's save_pretrained progress bars
  data = open(os.path.join(hf_dir, "model.safetensors"), "rb").read()
  n = int.from_bytes(data[:8], "little")
  cases = {"cut in the header": data[:8 + n // 2], "cut in the tensors": data[:-100], "cut in the length": data[:5],
           "header not JSON": data[:8] + b"\xff" * n + data[8 + n:]}
  for i, (case, content) in enumerate(cases.items()):
    d = _copy_of(hf_dir, tmp_path / f"hf{i}")
    (d / "model.safetensors").write_bytes(content)
    with pytest.raises(convert_hf.ConversionError, match="not a readable safetensors file"):
      convert_hf.read_weights(str(d))
    assert cli.main(["convert-hf", str(d), "--out", str(tmp_path / f"run{i}")]) == 2, case
    err = capsys.readouterr().err
    assert err.startswith(f"altbench: error: {d / 'model.safetensors'}: not a readable safetensors file"), (case, err)
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / f"run{i}"), case


def test_unreadable_json_files_are_named(converted, tmp_path, capsys):
  _, hf_dir, _ = converted("llama")
  capsys.readouterr()
  d = _copy_of(hf_dir, tmp_path / "hf")
  (d / "model.safetensors.index.json").write_text('{"weight_map": ')
  with pytest.raises(convert_hf.ConversionError, match=r"model.safetensors.index.json: not valid JSON"):
    convert_hf.read_weights(str(d))
  (d / "config.json").write_text('{"architectures": ')
  assert cli.main(["convert-hf", str(d), "--out", str(tmp_path / "run")]) == 2
  assert f"{d / 'config.json'}: not valid JSON" in capsys.readouterr().err
