"""Training throughput: altbench's Mamba-2 LM (JAX/XLA, chunked SSD) against Hugging Face Mamba2ForCausalLM
(PyTorch, its pure-torch chunked path on the CPU), same config, side by side in one process.

Config: d_model 256, 4 Mamba-2 layers (no MLPs), d_state 64, headdim 64, expand 2, 1 group, chunk 64,
conv width 4, vocab 256, batch 8, length 256, AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1), float32.
A step is forward + backward + clip + update. Rounds alternate the runners (order flipping each round)
and the median round is reported; the last line has ratio = altbench tokens/s / torch tokens/s. Like HF's,
the `altbench` batch has one document per row (no segment ids); `altbench_packed` adds the segment ids the
training loop feeds packed documents with (the conv and the scan then mask across document boundaries).
`matmuls_jax` and `matmuls_torch` time the step's dense matmuls alone (every projection and the head,
forward and both backward products, the same shapes): the floor each framework's step sits on, so the
report shows how much of a step is the scan and the elementwise work around it.

  altbench bench mamba_throughput --steps 5 --repeats 5 [--out FILE]
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


from altbench.archs import lm
from altbench.train import step as train_step
from altbench.train.config import TrainConfig

D, LAYERS, STATE, HEADDIM, CHUNK, VOCAB = 256, 4, 64, 64, 64, 256


def altbench_runner(tokens, packed=False):
  cfg = lm.Config(pattern="M" * LAYERS, mlp=False, d_model=D, d_state=STATE, ssm_headdim=HEADDIM, chunk_size=CHUNK,
                  vocab_size=VOCAB, n_heads=4, norm_eps=1e-5)
  tcfg = TrainConfig(steps=10**9, warmup_steps=0, lr=1e-3, b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0)
  x = jnp.asarray(tokens)
  batch = {"inputs": x[None, :, :-1], "targets": x[None, :, 1:], "loss_mask": jnp.ones_like(x[None, :, 1:]),
           "nbytes": jnp.ones_like(x[None, :, 1:])}
  if packed:
    batch["segment_ids"] = jnp.ones_like(x[None, :, 1:])
  return train_step.fixed_batch_runner(lm, cfg, tcfg, batch)


def torch_runner(tokens):
  import torch
  from transformers import Mamba2Config, Mamba2ForCausalLM
  torch.manual_seed(0)
  cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, state_size=STATE, head_dim=HEADDIM,
                     num_heads=2 * D // HEADDIM, expand=2, n_groups=1, conv_kernel=4, chunk_size=CHUNK,
                     layer_norm_epsilon=1e-5, tie_word_embeddings=False, use_bias=False, use_conv_bias=True)
  model = Mamba2ForCausalLM(cfg).float().train()
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
  no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-3, betas=(0.9, 0.95))
  x = torch.as_tensor(tokens, dtype=torch.long)

  def run(n):
    loss = None
    for _ in range(n):
      logits = model(x[:, :-1]).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
    return loss.item()

  return run, sum(p.numel() for p in model.parameters())


def matmul_runner(batch, length, use_torch):
  """The step's dense matmuls (in_proj, out_proj per layer, the head): x @ W forward, dx and dW backward."""
  di = 2 * D
  shapes = [(D, 2 * di + 2 * STATE + di // HEADDIM), (di, D)] * LAYERS + [(D, VOCAB)]
  rng = np.random.default_rng(0)
  xs = [rng.standard_normal((batch * length, k), np.float32) for k, _ in shapes]
  ws = [0.02 * rng.standard_normal(s, np.float32) for s in shapes]
  cts = [rng.standard_normal((batch * length, n), np.float32) for _, n in shapes]
  flops = 6 * batch * length * sum(k * n for k, n in shapes)
  if use_torch:
    import torch
    xs, ws = ([torch.tensor(a, requires_grad=True) for a in group] for group in (xs, ws))
    cts = [torch.tensor(a) for a in cts]

    def run(n):
      for _ in range(n):
        for t in xs + ws:
          t.grad = None  # fresh gradients, as jax's: no accumulation into the last step's
        torch.autograd.backward([x @ w for x, w in zip(xs, ws)], cts)
      return 0.0
  else:
    xs, ws, cts = ([jnp.asarray(a) for a in group] for group in (xs, ws, cts))
    grads = jax.jit(jax.grad(lambda xs, ws: sum(jnp.vdot(x @ w, ct) for x, w, ct in zip(xs, ws, cts)), (0, 1)))

    def run(n):
      for _ in range(n):
        out = grads(xs, ws)
      jax.block_until_ready(out)
      return 0.0
  return run, flops


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--out")
  args = parser.parse_args()
  import torch
  torch.set_num_threads(os.cpu_count())
  tokens = np.random.default_rng(0).integers(0, VOCAB, (args.batch, args.length + 1))
  runners = {"altbench": altbench_runner(tokens), "hf_torch": torch_runner(tokens),
             "altbench_packed": altbench_runner(tokens, packed=True),
             "matmuls_jax": matmul_runner(args.batch, args.length, False),
             "matmuls_torch": matmul_runner(args.batch, args.length, True)}
  first = {name: run(1) for name, (run, _) in runners.items()}  # compile / warm up
  times = {name: [] for name in runners}
  for r in range(args.repeats):
    for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
      t0 = time.perf_counter()
      runners[name][0](args.steps)
      times[name].append((time.perf_counter() - t0) / args.steps)
  device = f"cpu x{os.cpu_count()} ({platform.processor() or platform.machine()})"
  lines = []
  step_ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
  for name, (_, size) in runners.items():
    line = {"bench": "mamba_throughput", "impl": name, "step_ms": round(step_ms[name], 2)}
    if name.startswith("matmuls"):
      line["gflop_per_s"] = round(size / step_ms[name] / 1e6, 1)
    else:
      line.update({"tokens_per_s": round(args.batch * args.length / step_ms[name] * 1e3, 1), "params": int(size),
                   "loss_first": round(first[name], 4), "ln_vocab": round(math.log(VOCAB), 4)})
    lines.append({**line, "device": device, "jax": jax.__version__, "torch": torch.__version__})
  lines.append({"bench": "mamba_throughput", "ratio": round(step_ms["hf_torch"] / step_ms["altbench"], 3),
                "ratio_packed": round(step_ms["hf_torch"] / step_ms["altbench_packed"], 3),
                # the ratio if altbench's step were its matmuls and nothing else
                "ratio_at_matmul_floor": round(step_ms["hf_torch"] / step_ms["matmuls_jax"], 3),
                "altbench_beyond_matmuls_ms": round(step_ms["altbench"] - step_ms["matmuls_jax"], 1),
                "hf_beyond_matmuls_ms": round(step_ms["hf_torch"] - step_ms["matmuls_torch"], 1),
                "target": ">= 2 on a 2-core CPU"})
  for line in lines:
    print(json.dumps(line), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.writelines(json.dumps(l) + "\n" for l in lines)


if __name__ == "__main__":
  main()
