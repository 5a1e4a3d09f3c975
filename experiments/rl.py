"""GRPO on a reasoning task with an exact checker (train/grpo.py, issue 24 part 1): an SFT stage, then RL from it.

One command trains both stages: `altbench train experiments/rl.py:smoke --workdir runs/rl` first trains the model
supervised for rl.sft_steps steps in runs/rl/sft (a run directory of its own, resumed or found finished like any
other), then runs GRPO in runs/rl from its parameters, which are also the frozen KL reference. `altbench report
runs/rl runs/rlh` plots reward and pass@1 against the RL step (rl.png); runs/rl/sft is the SFT run.

Task: 2 x 2 digit multiplication with its CoT (mult, task_size=2: reversed digits, partial products and running
sums), answers checked exactly. Rewards: 1 for the exact product, else 0 (rl.checker="true"). The SFT stage is
short on purpose, so that its model's pass@1 is well inside (0, 1) and RL has something to raise (a group whose
samples are all right or all wrong gives no gradient).

Variants (every one: SFT at lr 3e-3 on 64 rows a step; GRPO on 16 problems x G = 8 samples a step, epsilon 0.2,
beta 0.04 (k3 to the SFT model), 2 updates per rollout batch, temperature 1, lr 3e-5 constant after 5 warmup
steps; eval pass@1 from 4 samples of each of 128 held-out problems; seed train.seed for the SFT data and the
rollouts):
  smoke           transformer "AAAA", d 64 (0.25M parameters); SFT 1000 steps, then 100 GRPO steps (a few CPU
                  minutes in all)
  cpu-transformer transformer "AAAA", d 128; SFT 1500 steps, then 200 GRPO steps
  cpu-mamba2      Mamba-2 "MMMMMM" (no MLPs), d 128
  cpu-hybrid      "MMAM" hybrid, d 128
  cpu-recurrent   recurrent depth (prelude 1, core 2, coda 1; zero initial state), GRPO rollouts and log-probs at
                  r = rl.iters = 4
Measured (smoke, seed 0, the project's 2-core CPU shared with other jobs, load average ~14: 10 minutes wall, 3.3
CPU-minutes user): SFT model's eval pass@1 0.320 (128 held-out problems x 4 samples at temperature 1), after 100
GRPO steps 0.391 (0.365, 0.383, 0.365, 0.396 at steps 20-80); rollout reward (the same checker) 0.32 over the first
10 steps, 0.39-0.43 over the last 30; per-token KL to the SFT model 0.003 -> 0.02-0.03. Seed 1 (quiet CPU, 2.2 minutes
wall in all): its SFT model is weaker, pass@1 0.078 -> 0.104 after 100 steps (rollout reward ~0.09 throughout). Two
seeds, one task: small lifts, not yet a claim. The cpu-* variants ran only as
mechanics checks (a few steps); at that load their SFT stage took 2-4 s a step (1500 steps), so none was measured.
Why lr 3e-5: at 3e-4 (the SFT stage's final lr) the per-token KL to the reference climbed to 0.2-0.7 within 20
steps and held-out pass@1 fell from 0.38 to 0.14-0.18 (smoke, seed 0, 64 x 4 samples); at 1e-4 it stayed flat.
"""

from altbench.archs import backbone, recurrent
from altbench.train.config import Config, DataConfig, RLConfig, TrainConfig, check_variant

VARIANTS = ("smoke", "cpu-transformer", "cpu-mamba2", "cpu-hybrid", "cpu-recurrent")


def task_data(eval_examples=256):
  return DataConfig(dataset="mult", task_size=2, task_mode="cot", seq_len=40, eval_examples=eval_examples)


def get_config(variant="smoke"):
  check_variant(variant, VARIANTS)
  smoke = variant == "smoke"
  width = dict(d_model=64, n_heads=2) if smoke else dict(d_model=128, n_heads=4)
  arch = "transformer" if smoke else variant.removeprefix("cpu-")
  family = "lm"
  if arch == "transformer":
    model = backbone.Config(pattern="AAAA", **width)
  elif arch == "mamba2":
    model = backbone.Config(pattern="MMMMMM", mlp=False, ssm_headdim=32, chunk_size=16, **width)
  elif arch == "hybrid":
    model = backbone.Config(pattern="MMAM", ssm_headdim=32, chunk_size=16, **width)
  else:
    family = "recurrent"
    model = recurrent.Config(pattern="AAAA", prelude=1, coda=1, mean_iters=3.0, max_iters=6, backprop_iters=2,
                             test_iters=4, state_std=0.0, **width)
  sft_steps, rl_steps = (1000, 100) if smoke else (1500, 200)
  train = TrainConfig(steps=rl_steps, batch_size=128, lr=3e-5, warmup_steps=5, min_lr_ratio=1.0, weight_decay=0.0,
                      log_every=1, eval_every=20 if smoke else 25, ckpt_every=20 if smoke else 25, samples=2,
                      sample_len=40, objective="grpo")
  rl = RLConfig(group_size=8, epsilon=0.2, beta=0.04, updates=2, temperature=1.0, eval_problems=128, eval_samples=4,
                sft_steps=sft_steps, sft_lr=3e-3, sft_batch_size=64, iters=4 if family == "recurrent" else 0)
  return Config(family=family, model=model, data=task_data(128 if smoke else 256), train=train, rl=rl)


