"""GRPO (train/grpo.py): the objective against a float64 numpy reference, zero policy gradient for equal rewards,
a bandit that GRPO solves for attention and Mamba-2, and an RL run that resumes to the same rewards."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from altbench import archs
from altbench.archs import backbone
from altbench.train import config, grpo, step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(logp, old, ref, adv, mask, eps, beta, dr_grpo):
  """GRPO's loss and d loss / d logp, written out in float64 numpy."""
  logp, old, ref, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, ref, adv, mask))
  ratio = np.exp(logp - old)
  a = adv[:, None]
  unclipped, clipped = ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a
  pg = -np.minimum(unclipped, clipped)
  kl = np.exp(ref - logp) - (ref - logp) - 1
  denom = mask.size if dr_grpo else mask.sum()
  loss = ((pg + beta * kl) * mask).sum() / denom
  # d pg / d logp = -A ratio where the unclipped branch is the smaller (else the clipped one is constant: 0)
  d_pg = np.where(unclipped <= clipped, -a * ratio, 0.0)
  d_kl = 1.0 - np.exp(ref - logp)
  return loss, (d_pg + beta * d_kl) * mask / denom


def _hand_batch():
  adv = grpo.advantages([1.0, 0.0, 0.0, 1.0, 2.0, 2.0], group_size=2)  # groups (1, 0), (0, 1), (2, 2)
  old = np.log(np.full((6, 4), 0.3))
  # per-token ratios: inside the clip range, above 1 + eps and below 1 - eps, for positive and negative advantages
  ratio = np.array([[1.0, 1.5, 0.6, 1.1], [1.0, 1.5, 0.6, 0.9], [1.3, 0.7, 1.0, 1.05],
                    [0.5, 1.4, 1.0, 1.0], [1.0, 1.5, 0.5, 1.0], [0.8, 1.0, 1.0, 1.2]])
  logp = old + np.log(ratio)
  ref = logp + np.array([0.3, -0.2, 0.0, 0.5])[None]  # KL terms of both signs of log(ref / pi)
  mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
  return logp, old, ref, adv, mask


def test_advantages_are_group_normalized_and_dr_grpo_only_centred():
  r = np.array([1.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0])
  a = grpo.advantages(r, 4)
  g = r[:4]
  np.testing.assert_allclose(a[:4], (g - g.mean()) / (g.std() + grpo.ADV_EPS), rtol=1e-6)
  np.testing.assert_array_equal(a[4:], 0.0)
  np.testing.assert_allclose(grpo.advantages(r, 4, dr_grpo=True)[:4], g - g.mean(), rtol=1e-6)


@pytest.mark.parametrize("dr_grpo", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_objective_and_gradient_equal_the_numpy_reference(beta, dr_grpo):
  logp, old, ref, adv, mask = _hand_batch()
  eps = 0.2
  f = lambda lp: grpo.objective(lp, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.asarray(adv),
                                jnp.asarray(mask), epsilon=eps, beta=beta, dr_grpo=dr_grpo)
  (loss, sums), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
  want_loss, want_grad = _reference(logp, old, ref, adv, mask, eps, beta, dr_grpo)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
  ratio, a = np.exp(logp - old), adv[:, None]
  clipped = ((ratio > 1 + eps) & (a > 0)) | ((ratio < 1 - eps) & (a < 0))
  assert clipped[mask > 0].any() and ((ratio > 1 + eps) & (a < 0) & (mask > 0)).any()  # both sides of the clip
  if beta == 0:
    assert (np.asarray(grad)[clipped & (mask > 0)] == 0).all()
  assert float(sums["clipped"]) == (clipped * mask).sum() and float(sums["ctokens"]) == mask.sum()
  kl = np.exp(ref - logp) - (ref - logp) - 1
  np.testing.assert_allclose(float(sums["kl"]), (kl * mask).sum(), rtol=1e-5)


def _tiny(pattern, vocab=32):
  return backbone.Config(pattern=pattern, d_model=32, n_heads=2, d_ff=64, vocab_size=vocab, d_state=16,
                         ssm_headdim=16, chunk_size=8)


def test_equal_rewards_in_a_group_give_zero_policy_gradient():
  family = archs.get_family("lm")
  model = family.build(_tiny("AA"), nnx.Rngs(0))
  rl = config.RLConfig(group_size=4, beta=0.0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(1), (8, 10), 0, 32)
  logp = grpo.completion_logprobs("lm", model, tokens, 4, rl.temperature)[0]
  batch = {"tokens": tokens, "mask": jnp.ones((8, 4)), "old_logp": logp + 0.1, "ref_logp": logp,
           "advantages": jnp.asarray(grpo.advantages([1, 1, 1, 1, 0, 0, 0, 0], 4))}
  loss_fn = grpo.make_loss("lm", rl)
  grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch, None)[0])(params)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
  # the same batch with unequal rewards does move the parameters (the check above can fail)
  batch["advantages"] = jnp.asarray(grpo.advantages([1, 0, 1, 1, 0, 0, 0, 0], 4))
  grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch, None)[0])(params)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0


def _bandit(pattern, steps=40, seed=0):
  """GRPO on a bandit: after the prompt, emit the digit '7' (reward 1, else 0), from a random model. Returns the
  mean reward per step."""
  target, vocab = 7, 16  # tokens 0..15: '0'..'9' are 0..9 here; chance is 1/16
  family = archs.get_family("lm")
  model_cfg = _tiny(pattern, vocab)
  rl = config.RLConfig(group_size=16, beta=0.04, updates=2, temperature=1.0)
  tcfg = config.TrainConfig(steps=steps, lr=1e-2, warmup_steps=0, grad_clip=1.0)
  opt_cfg = dataclasses.replace(tcfg, steps=steps * rl.updates)
  tx = step.make_optimizer(opt_cfg)
  graphdef, state = step.init_state(family, model_cfg, tx, seed)
  ref = jax.tree.map(jnp.copy, state["params"])
  rollouts = grpo.Rollouts(family, "lm", model_cfg, rl, graphdef, ref, n_new=2)
  train_step = jax.jit(step.make_train_step(grpo.LossFamily("lm", rl), graphdef, tx, opt_cfg))
  prompts = np.tile(np.array([[12, 3, 13]], np.int32), (64, 1))

  def score(completion_BN):
    return (completion_BN[:, 0] == target).astype(np.float32), {}

  rewards = []
  for s in range(steps):
    key = jax.random.fold_in(jax.random.key(seed), s)
    batch, host = rollouts.batch(state["params"], state["rest"], prompts, key, score)
    rewards.append(host["reward"])
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    for u in range(rl.updates):
      state, _ = train_step(state, batch, jax.random.fold_in(key, u))
  return rewards


@pytest.mark.parametrize("pattern", ["AA", "MM"])
def test_grpo_learns_a_bandit(pattern):
  rewards = _bandit(pattern)
  assert np.mean(rewards[:2]) < 0.3  # about chance (1/16) at the start
  assert np.mean(rewards[-3:]) > 0.9, rewards


def _rl_cfg(steps, init_from=""):
  """GRPO on 1 x 1 digit products (no CoT) from init_from: 4 problems x 4 samples per step, 2 updates each."""
  return config.Config(
      family="lm", model=_tiny("AA", vocab=0),
      data=config.DataConfig(dataset="mult", task_size=1, task_mode="nocot", seq_len=32, eval_examples=16),
      train=config.TrainConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=0, log_every=1, eval_every=0,
                               ckpt_every=2, samples=0, objective="grpo", init_from=init_from),
      rl=config.RLConfig(group_size=4, updates=2, eval_problems=4, eval_samples=2))


def _sft(workdir):
  """A start whose rollouts earn some reward (40 supervised steps: the answer format and a few products)."""
  from altbench.train import loop
  cfg = _rl_cfg(40)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, objective="supervised", lr=1e-2, ckpt_every=0))
  loop.train(cfg, workdir, log=lambda *_: None)
  return workdir


def _rl_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return {l["step"]: (l["reward"], l["loss"], l["kl"]) for l in lines if "reward" in l}


_KILL_SCRIPT = """
import os, signal, sys
from altbench.train import loop, metrics
import tests.test_grpo as t
orig = metrics.MetricsLog.write
def write(self, record):
  orig(self, record)
  if record.get("step") == 3 and "reward" in record:
    os.kill(os.getpid(), signal.SIGKILL)
metrics.MetricsLog.write = write
loop.train(t._rl_cfg(6, sys.argv[2]), sys.argv[1])
"""


def test_killed_rl_run_resumes_to_the_same_rewards(tmp_path):
  """Rollouts are a function of (seed, step) and the parameters: a run killed mid-way resumes from its step-2
  checkpoint and logs the same rewards, losses and KLs as an uninterrupted one (bitwise on CPU)."""
  from altbench.train import loop
  sft = _sft(str(tmp_path / "sft"))
  loop.train(_rl_cfg(6, sft), str(tmp_path / "full"), log=lambda *_: None)
  killed = str(tmp_path / "killed")
  proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, killed, sft], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert max(_rl_lines(killed)) == 3  # killed after step 3's line, with the checkpoint of step 2
  loop.train(_rl_cfg(6, sft), killed, log=lambda *_: None)
  full, resumed = _rl_lines(str(tmp_path / "full")), _rl_lines(killed)
  assert sorted(resumed) == list(range(1, 7))
  assert resumed == full
  assert len({r for r, _, _ in full.values()}) > 1  # the rewards are not all equal, so the check can fail


def test_grpo_config_errors_name_the_field():
  base = _rl_cfg(2)
  cases = [(dataclasses.replace(base, rl=dataclasses.replace(base.rl, group_size=3)), "rl.group_size=3"),
           (dataclasses.replace(base, rl=dataclasses.replace(base.rl, checker="x")), "rl.checker='x'"),
           (dataclasses.replace(base, rl=dataclasses.replace(base.rl, epsilon=0.0)), "rl.epsilon=0.0"),
           (dataclasses.replace(base, data=config.DataConfig(dataset="pystdlib")), "has no checker"),
           (dataclasses.replace(base, train=dataclasses.replace(base.train, objective="ppo")), "train.objective='ppo'"),
           (dataclasses.replace(base, family="diffusion", model=archs.get_family("diffusion").Config()),
            "family='diffusion'")]
  for cfg, needle in cases:
    with pytest.raises(config.ConfigError, match=None) as e:
      config.validate(cfg)
    assert needle in str(e.value), (needle, str(e.value))
  config.validate(base)


FAMILY_CASES = [("lm", "AA"), ("lm", "MM"), ("lm", "MA"), ("lm", "PP"), ("lm", "GG"), ("lm", "GA"),
                ("recurrent", "AAA"), ("coconut", "AA"), ("megabyte", "A"), ("blt", "A")]


@pytest.mark.slow
@pytest.mark.parametrize("family_name,pattern", FAMILY_CASES)
def test_forward_scores_what_the_decoder_sampled(family_name, pattern):
  """For every causal family GRPO supports: rollouts at a near-greedy temperature are the forward pass' argmax (the forward and the decoder agree on every sampled token: KV cache / SSM state / recurrent depth's initial
  state / Coconut's thoughts), Coconut's forced thoughts and <eot> are left out of the mask, and one update is
  finite."""
  from altbench.train import reasoning_tasks as rt
  family = archs.get_family(family_name)
  base = dataclasses.asdict(_tiny(pattern, vocab=262))
  extra = {"recurrent": dict(prelude=1, coda=1, test_iters=2, state_std=1.0),
           "coconut": dict(thoughts=2, mask_id=rt.MASK, bot_id=rt.BOT, eot_id=rt.EOT),
           "megabyte": dict(local_pattern="A", patch_size=4, d_local=16, local_heads=2),
           "blt": dict(encoder_pattern="A", decoder_pattern="A", patcher="space", max_patch_len=4, hash_buckets=64,
                       d_local=16, local_heads=2)}.get(family_name, {})
  if family_name in ("megabyte", "blt"):
    base = {k: v for k, v in base.items() if k in {f.name for f in dataclasses.fields(family.Config)}}
  model_cfg = family.Config(**base, **extra)
  rl = config.RLConfig(group_size=2, temperature=1e-4, beta=0.1)
  tcfg = config.TrainConfig(steps=2, lr=1e-3, warmup_steps=0)
  tx = step.make_optimizer(tcfg)
  graphdef, state = step.init_state(family, model_cfg, tx, 0)
  n_new = 6
  rollouts = grpo.Rollouts(family, family_name, model_cfg, rl, graphdef, state["params"], n_new)
  prompts = np.array(jax.random.randint(jax.random.key(3), (4, 5), 0, 256), np.int32)
  prompts[:, -1] = rt.BOT
  score = lambda completion_BN: (np.arange(len(completion_BN), dtype=np.float32) % 3, {})
  batch, host = rollouts.batch(state["params"], state["rest"], prompts, jax.random.key(4), score)
  forced = extra.get("thoughts", -1) + 1
  assert (batch["mask"][:, :forced] == 0).all() and (batch["mask"][:, forced] == 1).all()
  sampled = batch["mask"] > 0
  # p > 1/2 at a near-zero temperature: the forward's argmax is the decoded token (a near-tie can leave p < 1)
  assert np.exp(batch["old_logp"][sampled]).min() > 0.5, batch["old_logp"]
  assert np.median(np.exp(batch["old_logp"][sampled])) > 0.99
  rl = dataclasses.replace(rl, temperature=1.0)  # (near-greedy log-probs are saturated: no gradient to speak of)
  rollouts = grpo.Rollouts(family, family_name, model_cfg, rl, graphdef, state["params"], n_new)
  batch, host = rollouts.batch(state["params"], state["rest"], prompts, jax.random.key(4), score)
  train_step = jax.jit(step.make_train_step(grpo.LossFamily(family_name, rl), graphdef, tx, tcfg))
  _, out = train_step(state, {k: jnp.asarray(v)[None] for k, v in batch.items()}, jax.random.key(0))
  assert np.isfinite(float(out["loss"])) and float(out["grad_norm"]) > 0
