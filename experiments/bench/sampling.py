"""Sampling cost and quality: AR decoding vs masked-diffusion samplers, side by side in one process.

For each sampler prints tokens/s, model calls and, when a trained AR judge run is given, the judge's bits
per byte on the samples (generative perplexity, lower is better) and the samples' unigram entropy in bits
(very low entropy flags repetitive text, which fools perplexity). The judge is --judge-run, else the AR run
itself (which flatters the AR samples: a model likes its own samples; give another run trained on the same
data for a fair judge). The held-out text's own bpb under the judge is printed as the reference level.
Without run directories the models are random-init (cost only).

--temperatures sweeps the softmax temperature of every sampler (AR included): lowering it trades entropy for
judge bpb, so a diffusion sampler's quality can be matched to AR's at temperature 1 and its cost compared there
(each line names its temperature; the entropy column says what the match cost in diversity).

  python experiments/bench/sampling.py                                   # cost on random-init models
  python experiments/bench/sampling.py --ar-run runs/ar --diffusion-run runs/mdlm --judge-run runs/ar2
"""

import argparse
import json
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


from altbench.archs import diffusion, lm

MASK, EOS = 258, 256


def _load(run):
  """(corpus, model) of a run directory."""
  from altbench.train import loop
  _, _, corpus, graphdef, state, _, _ = loop.load_run(run)
  return corpus, nnx.merge(graphdef, state["params"], state["rest"])


def _heldout(corpus, batch, length):
  """batch windows of `length` tokens evenly spaced over the corpus's held-out stream (mostly mid-document, so
  the judge, which reads each after an <eos>, scores them a little worse than document openings)."""
  starts = np.linspace(0, len(corpus.eval) - length - 1, batch).astype(int)
  return jnp.asarray(corpus.eval[starts[:, None] + np.arange(length)])


def judge_bpb(judge, samples_BL):
  """Bits per byte of the judge AR model on byte-token samples (each sample scored after an <eos>)."""
  inputs = jnp.concatenate([jnp.full((samples_BL.shape[0], 1), EOS), samples_BL[:, :-1]], 1)
  logits, _ = judge(inputs)
  nll = lm.token_nll(logits, samples_BL, (samples_BL < 256).astype(jnp.float32))
  return float(nll.sum() / math.log(2) / jnp.sum(samples_BL < 256))


def unigram_entropy_bits(samples_BL):
  counts = np.bincount(np.asarray(samples_BL).ravel(), minlength=262).astype(float)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ar-run")
  parser.add_argument("--diffusion-run")
  parser.add_argument("--judge-run", help="an AR run that scores the samples (default: --ar-run)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--steps", type=int, nargs="+", default=[16, 64, 128])
  parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
  args = parser.parse_args()
  judge = None
  if args.ar_run:
    ar_corpus, ar = _load(args.ar_run)
    judge = _load(args.judge_run)[1] if args.judge_run else ar
  else:
    ar = lm.build(lm.Config(vocab_size=262, d_model=128, n_heads=4, pattern="AAA"), nnx.Rngs(0))
  if args.diffusion_run:
    _, dm = _load(args.diffusion_run)
  else:
    dm = diffusion.build(diffusion.Config(vocab_size=262, d_model=128, n_heads=4, pattern="AAA", mask_id=MASK,
                                          eos_id=EOS), nnx.Rngs(0))
  device = f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})"
  prompt = jnp.full((args.batch, 1), EOS, jnp.int32)
  n_new = args.length

  def report(name, fn, calls, temperature):
    out = fn()  # compile
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    dt = time.perf_counter() - t0
    samples = out[0][:, 1:] if isinstance(out, tuple) else out[:, 1:]
    calls = out[1] if isinstance(out, tuple) else calls
    line = {"bench": "sampling", "sampler": name, "temperature": temperature,
            "tokens_per_s": round(args.batch * n_new / dt, 1),
            "model_calls": int(calls), "length": n_new, "batch": args.batch, "device": device,
            "unigram_entropy_bits": round(unigram_entropy_bits(samples), 3)}
    if judge is not None:
      line["judge_bpb"] = round(judge_bpb(judge, samples), 4)
    print(json.dumps(line), flush=True)

  key = jax.random.key(args.seed)
  if judge is not None:
    print(json.dumps({"bench": "sampling", "sampler": "held-out windows", "judge_bpb": round(judge_bpb(
        judge, _heldout(ar_corpus, args.batch, n_new)), 4), "length": n_new, "batch": args.batch}), flush=True)
  canvas = jnp.concatenate([prompt, jnp.full((args.batch, n_new), MASK, jnp.int32)], 1)
  fixed = jnp.broadcast_to(jnp.arange(n_new + 1)[None] < 1, canvas.shape)
  for temp in args.temperatures:
    report("ar", lambda: lm.generate(ar, prompt, n_new, key, temperature=temp), n_new, temp)
    for steps in args.steps:
      for sampler in diffusion.SAMPLERS:
        report(f"{sampler}-{steps}", lambda: diffusion.infill(dm, canvas, fixed, key, steps=steps, sampler=sampler,
                                                              temperature=temp), None, temp)


if __name__ == "__main__":
  main()
