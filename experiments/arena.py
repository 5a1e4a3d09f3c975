"""The arena: every family at equal training FLOPs on the same data and seed (`altbench arena experiments/arena.py`).

Groups (each its own budget and leaderboard section):
  pystdlib   held-out bits per byte on the stdlib's source, byte tokenizer unless said: transformer ("A" x n, the
             byte-level transformer, whose FLOPs per step x BASELINE_STEPS set the budget), bpe-transformer
             (cpu/gpu only: a BPE tokenizer is trained first), mamba2 (pure Mamba-2), hybrid (interleaved "MMAM"),
             falcon (Falcon-H1-style parallel "P" blocks), gdn (pure Gated DeltaNet) and gdn-hybrid (Qwen3-Next's
             3:1 "GGGA"), all at the transformer's parameters
             (experiments/mamba.py); mdlm and bd3-4 diffusion (experiments/diffusion.py, bpb is the NELBO bound);
             megabyte-8, blt-space (SpaceByte-style space patches) and, cpu/gpu only, blt-entropy
             (experiments/bytes.py; its entropy model is the auxiliary entry entropy-lm, trained first and
             outside the budget: the smoke variant skips it and shows space patching only).
  reach      graph reachability (experiments/reasoning.py): nocot, cot, coconut, recurrent (recurrent depth) at
             the CoT baseline's budget; scored by greedy-decoding answer accuracy.
Variants: "smoke" (every entry tiny: 7-20 s each on a quiet 2-core CPU, compilation included), "cpu" (22 minutes
on 2 quiet CPU cores, measured; the AR transformer is then well ahead of diffusion), "gpu" (one GPU: the budget
of a GPT-2-small-shaped byte transformer, d 768 x 12 layers, 85M parameters, which GPT-2 small has besides its
38M of 50k-token embeddings, for 4000 steps of 32 x 1024 bytes), "gpu-short" (one short GPU visit: d 256 x 4 layers,
1,000 steps of 32 x 512 bytes, about 150x cpu's budget, sized for 8 minutes on one H100/H200 with compiles; no
BPE or entropy entries; experiments/bench/gpu_arena.sh runs it). "" is cpu. Steps per entry = budget / that entry's analytic FLOPs per step.
"""

import dataclasses
import os

from altbench.train import arena
from altbench.train.config import Config, DataConfig, TrainConfig, check_variant, load_module

VARIANTS = ("", "smoke", "cpu", "gpu", "gpu-short")
SIZES = {  # the text group's widths (every family at this width; Mamba-2 hybrids matched in parameters)
    "smoke": dict(d=64, heads=2, layers=2, local=32, local_heads=2, seq_len=128, batch=8, baseline_steps=60,
                  eval_bytes=8192, ssm=dict(d_state=16, ssm_headdim=16, chunk_size=32), lr=3e-3),
    "cpu": dict(d=128, heads=4, layers=3, local=64, local_heads=2, seq_len=128, batch=16, baseline_steps=300,
                eval_bytes=32768, ssm=dict(d_state=32, ssm_headdim=32, chunk_size=32), lr=2e-3),
    # One short GPU visit (issue 26): every entry within 8 minutes in all on one H100/H200, compile included, at
    # about 150x the cpu variant's budget per entry (d 256 x 4 layers, 1,000 steps of 32 x 512 bytes).
    "gpu-short": dict(d=256, heads=4, layers=4, local=128, local_heads=2, seq_len=512, batch=32, baseline_steps=1000,
                      eval_bytes=1 << 17, ssm=dict(d_state=64, ssm_headdim=64, chunk_size=64), lr=2e-3),
    "gpu": dict(d=768, heads=12, layers=12, local=384, local_heads=6, seq_len=1024, batch=32, baseline_steps=4000,
                eval_bytes=1 << 20, ssm=dict(d_state=64, ssm_headdim=64, chunk_size=64), lr=1e-3),
}
# The compute dtype of every entry where it is not the models' float32 (weights stay float32): bf16 on an
# accelerator, where impl="auto" takes the Pallas kernels only for 16-bit activations (tuning.pallas_dtype_pays).
DTYPE = {"gpu": "bfloat16", "gpu-short": "bfloat16"}
SEEDS = {"smoke": 1, "cpu": 3, "gpu": 3, "gpu-short": 1}  # runs per entry (train.seed + 0..n-1); `altbench arena --seeds N` overrides
REACH = {"smoke": dict(suffix="-smoke", baseline_steps=60), "cpu": dict(suffix="-smoke", baseline_steps=800),
         "gpu": dict(suffix="", baseline_steps=4000), "gpu-short": dict(suffix="-smoke", baseline_steps=2000)}
DECODE = {"smoke": dict(decode_contexts=(64, 256), decode_steps=4, reasoning_examples=32, recurrences=(1, 3)),
          "cpu": dict(decode_contexts=(128, 512, 2048), decode_steps=8, reasoning_examples=128, recurrences=(1, 3, 6)),
          "gpu": dict(decode_contexts=(1024, 4096, 16384), decode_steps=16, reasoning_examples=1024,
                      recurrences=(1, 3, 5, 8, 12)),
          "gpu-short": dict(decode_contexts=(512, 2048, 8192), decode_steps=8, reasoning_examples=256,
                            recurrences=(1, 3, 6))}


def _experiment(name):
  """experiments/<name>.py as a module, loaded when an entry is built (a broken family fails only its entries)."""
  return load_module(os.path.join(os.path.dirname(__file__), f"{name}.py"))


def text_config(family, model, s, tokenizer="bytes", eval_repeats=1):
  seq_len = s["seq_len"] // 4 if tokenizer == "bpe" else s["seq_len"]  # BPE tokens carry ~4 bytes: same bytes
  data = DataConfig(dataset="pystdlib", tokenizer=tokenizer, seq_len=seq_len, eval_bytes=s["eval_bytes"])
  train = TrainConfig(steps=s["baseline_steps"], batch_size=s["batch"], lr=s["lr"],
                      warmup_steps=s["baseline_steps"] // 10, eval_repeats=eval_repeats)
  return Config(family=family, model=model, data=data, train=train)


def _width(s):
  return dict(d_model=s["d"], n_heads=s["heads"], pattern="A" * s["layers"])


def _lm(arch, s):
  return lambda _: text_config("lm", _experiment("mamba").model_config(arch, d_model=s["d"], n_heads=s["heads"],
                                                                        n_layers=s["layers"], **s["ssm"]), s)


def _bpe(s):
  from altbench.archs import lm
  return lambda _: text_config("lm", lm.Config(**_width(s), vocab_size=DataConfig().bpe_vocab_size), s, "bpe")


def _diffusion(variant, s):
  def build(_):
    cfg = _experiment("diffusion").get_config(variant + "-smoke")  # its model kind; the arena sets the width
    return text_config("diffusion", dataclasses.replace(cfg.model, **_width(s)), s,
                       eval_repeats=cfg.train.eval_repeats)
  return build


def _bytes(arch, s, bytes_scale):
  def build(arena_dir):
    bytes_exp = _experiment("bytes")
    family, model = bytes_exp.model_config("space" if arch == "blt-entropy" else arch, bytes_scale)
    model = dataclasses.replace(model, **_width(s), d_local=s["local"], local_heads=s["local_heads"])
    if arch == "blt-entropy":  # the auxiliary entropy-lm entry of this arena is the entropy model
      run_dir = os.path.join(arena_dir, "entropy-lm")
      if not os.path.isfile(os.path.join(run_dir, arena.RESULT)):
        raise FileNotFoundError(f"{run_dir}: the entropy model has not been trained (entry entropy-lm)")
      theta = bytes_exp.calibrated_threshold(run_dir, s["seq_len"])
      model = dataclasses.replace(model, patcher="entropy", patcher_run=run_dir, min_mean_patch=3,
                                  entropy_threshold=theta)
    return text_config(family, model, s)
  return build


def _entropy_lm(bytes_scale, s):
  def build(_):
    cfg = text_config("lm", _experiment("bytes").entropy_lm_config(bytes_scale), s)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=s["baseline_steps"] // 2))
  return build


def _reach(arch, suffix):
  return lambda _: _experiment("reasoning").get_config(f"reach-{arch}{suffix}")


def _in_dtype(build, dtype):
  def build_in_dtype(arena_dir):
    cfg = build(arena_dir)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype))
  return build_in_dtype


def get_arena(variant=""):
  check_variant(variant, VARIANTS)
  v = variant or "cpu"
  s, r = SIZES[v], REACH[v]
  bytes_scale = "smoke" if v != "gpu" else ""  # experiments/bytes.py's model shapes
  transformer = _lm("transformer", s)
  text_budget = arena.flops_per_step(transformer(None)) * s["baseline_steps"]
  reach_budget = arena.flops_per_step(_reach("cot", r["suffix"])(None)) * r["baseline_steps"]
  groups = [arena.Group("pystdlib", "bpb", text_budget,
                        f"Held-out bits per byte on {s['eval_bytes']} bytes of the stdlib's source; widths d={s['d']}, "
                        f"{s['layers']} layers, windows of {s['seq_len']} bytes, batch {s['batch']}; the budget is "
                        f"the byte transformer's {s['baseline_steps']} steps. Diffusion: NELBO upper bound (<=)."),
            arena.Group("reach", "accuracy", reach_budget,
                        f"Graph reachability (ProsQA-like); the budget is the CoT baseline's {r['baseline_steps']} "
                        "steps. Answer accuracy by greedy decoding; exact = teacher-forced whole-answer match.")]
  entries = [
      arena.Entry("transformer", "pystdlib", "lm", transformer, "byte-level transformer (the byte transformer)"),
      arena.Entry("mamba2", "pystdlib", "lm", _lm("mamba2", s), "pure Mamba-2, parameters matched"),
      arena.Entry("hybrid", "pystdlib", "lm", _lm("nemotron", s), "interleaved Mamba-2/attention 'MMAM...'"),
      arena.Entry("falcon", "pystdlib", "lm", _lm("falcon", s), "Falcon-H1-style parallel attention + SSM"),
      arena.Entry("gdn", "pystdlib", "lm", _lm("gdn", s), "pure Gated DeltaNet, MLP width matched"),
      arena.Entry("gdn-hybrid", "pystdlib", "lm", _lm("gdn-hybrid", s), "Qwen3-Next-style Gated DeltaNet 3:1 attention"),
      arena.Entry("mdlm", "pystdlib", "diffusion", _diffusion("mdlm", s), "masked diffusion, bpb is a bound"),
      arena.Entry("bd3-4", "pystdlib", "diffusion", _diffusion("bd3-4", s), "block diffusion, blocks of 4"),
      arena.Entry("megabyte-8", "pystdlib", "megabyte", _bytes("megabyte-8", s, bytes_scale), "fixed 8-byte patches"),
      arena.Entry("blt-space", "pystdlib", "blt", _bytes("space", s, bytes_scale), "BLT, space patching"),
      arena.Entry("reach-nocot", "reach", "coconut", _reach("nocot", r["suffix"]), "answer right after the question"),
      arena.Entry("reach-cot", "reach", "coconut", _reach("cot", r["suffix"]), "chain of thought in tokens"),
      arena.Entry("reach-coconut", "reach", "coconut", _reach("coconut", r["suffix"]), "continuous thoughts"),
      arena.Entry("reach-recurrent", "reach", "recurrent", _reach("recurrent", r["suffix"]), "recurrent depth"),
  ]
  if v not in ("smoke", "gpu-short"):  # a BPE tokenizer and an entropy model to train first: not in a short run
    groups.append(arena.Group("aux", "bpb", 0.0, "Auxiliary runs outside the budget: BLT's entropy model."))
    entries[1:1] = [arena.Entry("bpe-transformer", "pystdlib", "lm", _bpe(s), "transformer on a 4096-token BPE")]
    entries.insert(0, arena.Entry("entropy-lm", "aux", "lm", _entropy_lm(bytes_scale, s), "BLT's entropy model"))
    entries.insert(entries.index(next(e for e in entries if e.name == "blt-space")) + 1,
                   arena.Entry("blt-entropy", "pystdlib", "blt", _bytes("blt-entropy", s, bytes_scale),
                               "BLT, entropy patching"))
  if v in DTYPE:
    entries = [dataclasses.replace(e, build=_in_dtype(e.build, DTYPE[v])) for e in entries]
  return arena.Arena(name=f"arena-{v}", groups=tuple(groups), entries=tuple(entries), evals=4, seeds=SEEDS[v],
                     **DECODE[v])
