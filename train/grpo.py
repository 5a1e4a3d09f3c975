"""GRPO (Shao et al., 2024, DeepSeekMath) as an objective of the shared loop, not a second trainer.

One loop step with train.objective = "grpo" (train/loop.py):
  1. rollout: rl.prompts problems of the step (the corpus' train examples of (seed, step)), each repeated
     rl.group_size = G times, continued by the family's own decoder (`family.generate`: KV cache / recurrent
     state / recomputation) at rl.temperature with the key fold_in(fold_in(key(seed), step), ROLLOUT_TAG), so a
     rollout is a pure function of (seed, step, params) and a resumed run redoes exactly the same ones;
  2. rewards on the host from the task's checker (train/rewards.py: rl.checker "true", or "buggy" with the
     planted bug), advantages normalized within each group, A = (r - mean_G r) / (std_G r + 1e-4), or with
     rl.dr_grpo Dr.GRPO's (Liu et al., 2025) unnormalized A = r - mean_G r;
  3. old log-probs (the rollout policy) and the reference's (the frozen init_from parameters), once;
  4. rl.updates optimizer steps on that batch (the loop's jitted train step, with `loss` below as the
     family's loss), each minimizing, over completion tokens t of row i,

       ratio = exp(logp - logp_old),  pg = -min(ratio A_i, clip(ratio, 1 - epsilon, 1 + epsilon) A_i)
       kl = exp(logp_ref - logp) - (logp_ref - logp) - 1       (Schulman's k3, >= 0, unbiased for KL(pi||ref))
       loss = sum_{i,t} mask (pg + beta kl) / sum_{i,t} mask   (token mean over the batch, as google/tunix)
            = sum_{i,t} mask (pg + beta kl) / (rows * max_new_tokens)   with rl.dr_grpo (no length bias)
     (with train.grad_accum > 1 the token mean is per micro-batch, and the micro-batches' gradients are averaged)

Log-probs are those of the sampling distribution, softmax(logits / temperature), from the family's forward
(one pass over prompt + completion). Completion tokens are the sampled ones up to and including the first
<eos>; tokens the decoder forces (Coconut's thoughts and its <eot>) are not actions and carry no policy term.

Families: `lm` on every causal pattern (A, M, P, G and hybrids), `recurrent` at a fixed test-time r (rl.iters;
its initial state is the one generate drew, so the forward scores exactly what was sampled; adaptive exit is
refused: a row's depth would depend on the sample), and `coconut`, whose continuous thoughts are deterministic
hidden states, not samples: the policy gradient acts on the tokens after them and reaches the thoughts through
the forward pass (pathwise). The byte families `megabyte` and `blt` work too (their forward's logits equal their
byte-by-byte decoder's). Not supported: `diffusion`, whose samples have no autoregressive per-token log-probs (it
unmasks in any order; its likelihood is a bound), so the ratio and the KL per token are undefined.
"""

import jax
import jax.numpy as jnp
import numpy as np

from altbench.train import rewards
from altbench.train import reasoning_tasks as rt

FAMILIES = ("lm", "coconut", "recurrent", "megabyte", "blt")
ROLLOUT_TAG = 0x52_4c  # "RL": rollout keys are fold_in(fold_in(key(seed), step), ROLLOUT_TAG)
EVAL_TAG = 0x45_56     # eval pass@1 keys: fold_in(key(seed), EVAL_TAG), the same at every eval
ADV_EPS = 1e-4
# Keys of the loop's metrics lines for a GRPO step (means over the rollout batch / completion tokens).
LOGGED = ("reward", "pass_at_1", "kl", "entropy", "completion_len", "clip_frac", "hack_frac")


def advantages(rewards_B, group_size, dr_grpo=False):
  """Group-relative advantages of rows laid out group by group (G consecutive rows per prompt), float32."""
  r_PG = np.asarray(rewards_B, np.float64).reshape(-1, group_size)
  a_PG = r_PG - r_PG.mean(axis=1, keepdims=True)
  if not dr_grpo:
    a_PG = a_PG / (r_PG.std(axis=1, keepdims=True) + ADV_EPS)
  return a_PG.reshape(-1).astype(np.float32)


def objective(logp_BN, old_BN, ref_BN, adv_B, mask_BN, *, epsilon, beta, dr_grpo=False):
  """(GRPO loss, sums for metrics) of per-token log-probs under the policy, the rollout policy and the reference.

  Sums: kl (k3 over completion tokens), clipped (tokens whose clipped branch is the smaller: no gradient),
  ctokens (completion tokens)."""
  mask_BN = mask_BN.astype(jnp.float32)
  adv_B1 = adv_B[:, None]
  ratio_BN = jnp.exp(logp_BN - old_BN)
  unclipped_BN = ratio_BN * adv_B1
  clipped_BN = jnp.clip(ratio_BN, 1.0 - epsilon, 1.0 + epsilon) * adv_B1
  pg_BN = -jnp.minimum(unclipped_BN, clipped_BN)
  log_ref_ratio_BN = ref_BN - logp_BN
  kl_BN = jnp.exp(log_ref_ratio_BN) - log_ref_ratio_BN - 1.0
  per_token_BN = pg_BN + beta * kl_BN
  denom = mask_BN.size if dr_grpo else jnp.maximum(jnp.sum(mask_BN), 1.0)
  loss = jnp.sum(per_token_BN * mask_BN) / denom
  sums = {"kl": jnp.sum(kl_BN * mask_BN), "clipped": jnp.sum((clipped_BN < unclipped_BN) * mask_BN),
          "ctokens": jnp.sum(mask_BN)}
  return loss, sums


def completion_logprobs(family_name, model, tokens_BL, n_new, temperature, iters=0, state0_BLD=None):
  """(log-prob of each of the last n_new tokens given those before (b, n_new), the sampling distribution's
  entropy there (b, n_new)): the family's forward over tokens[:, :-1], logits divided by temperature."""
  inputs_BL = tokens_BL[:, :-1]
  if family_name == "recurrent":
    from altbench.archs import recurrent
    x_BLD = model.embed_tokens(inputs_BL)
    logits_BLV = recurrent.forward_embeddings(model, x_BLD, iters or model.cfg.iters_at_test, state0_BLD)
  elif family_name == "coconut":
    from altbench.archs import coconut
    logits_BLV = coconut.forward(model, inputs_BL)
  else:  # lm: (logits, cache); blt: (logits, patch starts); megabyte: logits
    out = model(inputs_BL)
    logits_BLV = out[0] if isinstance(out, tuple) else out
  logits_BNV = logits_BLV[:, -n_new:].astype(jnp.float32) / temperature
  logp_BNV = jax.nn.log_softmax(logits_BNV, axis=-1)
  logp_BN = jnp.take_along_axis(logp_BNV, tokens_BL[:, -n_new:, None], axis=-1)[..., 0]
  entropy_BN = -jnp.sum(jnp.exp(logp_BNV) * logp_BNV, axis=-1)
  return logp_BN, entropy_BN


def make_loss(family_name, rl):
  """loss(model, batch, rng) -> (loss, metrics of sums): the GRPO objective as a family loss for train.step."""

  def loss(model, batch, rng):
    del rng
    logp_BN, entropy_BN = completion_logprobs(family_name, model, batch["tokens"], batch["mask"].shape[1],
                                              rl.temperature, rl.iters, batch.get("state0"))
    value, sums = objective(logp_BN, batch["old_logp"], batch["ref_logp"], batch["advantages"], batch["mask"],
                            epsilon=rl.epsilon, beta=rl.beta, dr_grpo=rl.dr_grpo)
    return value, {**sums, "entropy": jnp.sum(jax.lax.stop_gradient(entropy_BN) * batch["mask"])}

  return loss


class LossFamily:
  """The family interface train.step.make_train_step reads (only `loss`), with GRPO's loss."""

  def __init__(self, family_name, rl):
    self.loss = make_loss(family_name, rl)


def completion_mask(completion_BN, forced):
  """1.0 on sampled tokens up to and including the first <eos> (all of them without one), after the first
  `forced` positions (tokens the decoder writes itself)."""
  is_eos = completion_BN == rt.EOS
  before_BN = np.cumsum(is_eos, axis=1) - is_eos  # <eos> seen strictly before this position
  mask = (before_BN == 0).astype(np.float32)
  mask[:, :forced] = 0.0
  return mask


def forced_tokens(family_name, model_cfg, prompts_BT):
  """How many leading completion tokens the family's decoder writes without sampling (Coconut: k thoughts and
  <eot> after a prompt ending in <bot>)."""
  if family_name == "coconut" and model_cfg.thoughts and np.all(prompts_BT[:, -1] == model_cfg.bot_id):
    return model_cfg.thoughts + 1
  return 0


def max_new_tokens(rl, corpus):
  return rl.max_new_tokens or corpus.layout.tail_len + 2


def prompt_batch(corpus, examples):
  """Prompts of examples, left-padded with <pad> to a common width (filler prompts differ in width)."""
  rows = corpus.prompt_rows(examples)
  width = max(len(r) for r in rows)
  return np.stack([np.concatenate([np.full(width - len(r), rt.PAD, np.int32), r]) for r in rows])


def generate_kw(family_name, rl):
  return {"iters": rl.iters} if family_name == "recurrent" and rl.iters else {}


class Rollouts:
  """The rollout half of a GRPO step: batch(params, rest, prompts, key, score) samples rl.group_size completions per
  prompt row (rows come group by group) with the family's own decoder and returns the update batch; task(...)
  does it for a reasoning corpus' problems of (seed, step), scored by train/rewards.py."""

  def __init__(self, family, family_name, model_cfg, rl, graphdef, ref_params, n_new):
    from flax import nnx
    self.family, self.name, self.model_cfg, self.rl, self.graphdef = family, family_name, model_cfg, rl, graphdef
    self.ref_params, self.n_new = ref_params, n_new

    def logp(params, rest, tokens, state0):
      model = nnx.merge(graphdef, params, rest)
      return completion_logprobs(family_name, model, tokens, n_new, rl.temperature, rl.iters, state0)[0]

    self._logp = jax.jit(logp)

  def batch(self, params, rest, prompts_BT, key, score):
    """(update batch of numpy arrays, host metrics); score(completions_BN) -> (rewards (b,), host metrics)."""
    from flax import nnx
    rl = self.rl
    model = nnx.merge(self.graphdef, params, rest)
    tokens_BL = np.asarray(self.family.generate(model, prompts_BT, self.n_new, key, temperature=rl.temperature,
                                                **generate_kw(self.name, rl)), np.int32)
    completion_BN = tokens_BL[:, prompts_BT.shape[1]:]
    reward_B, host = score(completion_BN)
    mask_BN = completion_mask(completion_BN, forced_tokens(self.name, self.model_cfg, prompts_BT))
    state0 = None
    if self.name == "recurrent":  # the initial state generate drew (archs/recurrent.py _generate), inputs' part
      from altbench.archs import recurrent
      b, l = tokens_BL.shape
      state0 = recurrent.initial_state(self.model_cfg, jax.random.fold_in(key, 1),
                                       (b, l, self.model_cfg.d_model))[:, :l - 1]
    batch = {"tokens": tokens_BL, "mask": mask_BN, "advantages": advantages(reward_B, rl.group_size, rl.dr_grpo)}
    batch["old_logp"] = np.asarray(self._logp(params, rest, tokens_BL, state0))
    batch["ref_logp"] = (np.asarray(self._logp(self.ref_params, rest, tokens_BL, state0)) if rl.beta > 0
                         else batch["old_logp"])
    if state0 is not None:
      batch["state0"] = np.asarray(state0)
    host = {"reward": float(np.mean(reward_B)), "completion_len": float(mask_BN.sum(1).mean()), **host}
    return batch, host

  def task(self, params, rest, corpus, cfg, step):
    """batch() for the corpus' problems of (cfg.train.seed, step), key fold_in(fold_in(key(seed), step),
    ROLLOUT_TAG), rewards of rl.checker; host metrics add pass_at_1 (the true checker) and hack_frac."""
    rl = self.rl
    n_prompts = cfg.train.batch_size // rl.group_size
    examples = [ex for ex in corpus.train_examples(cfg.train.seed, step, n_prompts) for _ in range(rl.group_size)]

    def score(completion_BN):
      out = rewards.outcomes(examples, list(completion_BN), corpus.layout.depth)
      return out[rl.checker], {"pass_at_1": float(np.mean(out["true"])),
                               "hack_frac": float(np.mean([label == "hack" for label in out["label"]]))}

    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.train.seed), step), ROLLOUT_TAG)
    return self.batch(params, rest, prompt_batch(corpus, examples), key, score)


def step_metrics(outs, host):
  """The loop's metrics of one GRPO step: the updates' mean loss, grad_norm, lr and per-token kl, entropy,
  clip_frac, with the rollout's host metrics."""
  mean = lambda k: float(np.mean([float(o[k]) for o in outs]))
  per_token = lambda k: float(np.mean([float(o[k]) / max(float(o["ctokens"]), 1.0) for o in outs]))
  return {"loss": mean("loss"), "grad_norm": mean("grad_norm"), "lr": float(outs[-1]["lr"]), "kl": per_token("kl"),
          "entropy": per_token("entropy"), "clip_frac": per_token("clipped"), **host}


def eval_pass_at_1(family, model, corpus, cfg):
  """{"eval_pass_at_1": true-checker pass@1 of rl.eval_samples samples on each of the first rl.eval_problems eval
  problems at rl.temperature (same key at every eval), "eval_reward": the same under rl.checker}."""
  rl = cfg.rl
  seed = int(jax.random.randint(jax.random.fold_in(jax.random.key(cfg.train.seed), EVAL_TAG), (), 0, 2 ** 30))
  res = rewards.sampled_pass_at_k(family, model, corpus, n=rl.eval_problems, samples=rl.eval_samples, ks=(1,),
                                  seed=seed, temperature=rl.temperature, **generate_kw(cfg.family, rl))
  return {"eval_pass_at_1": res["true"][1], "eval_reward": res[rl.checker][1]}
