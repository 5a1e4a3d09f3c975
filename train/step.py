"""The optimizer and one functional, jit-compiled train step over nnx.split state, with donation.

State is a dict {"params", "rest", "opt", "step"} of nnx.State / optax pytrees, so the step is a pure
function (as in Flax's gemma example and MaxText) and can be lowered ahead of time for cost analysis.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def lr_schedule(tcfg):
  warmup = min(tcfg.warmup_steps, max(tcfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, tcfg.lr, warmup, max(tcfg.steps, warmup + 1),
                                            end_value=tcfg.lr * tcfg.min_lr_ratio)


def make_optimizer(tcfg):
  """AdamW with warmup + cosine decay and global-norm clipping; no decay on vectors (norms, SSM A/D/dt)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(lr_schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay, mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip), adamw) if tcfg.grad_clip > 0 else adamw


def build_model(family, model_cfg, rngs):
  """family.build, given the trained models the config embeds frozen (the family's optional frozen_runs: BLT's
  entropy model), each loaded from its run directory."""
  from altbench.train import loop  # loop imports this module
  runs = getattr(family, "frozen_runs", lambda cfg: {})(model_cfg)
  return family.build(model_cfg, rngs, **{key: loop.load_model(run)[1] for key, run in runs.items()})


def init_state(family, model_cfg, tx, seed):
  """Build the model and optimizer state; returns (graphdef, state). Call under jit to place it sharded."""
  model = build_model(family, model_cfg, nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, {"params": params, "rest": rest, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def make_train_step(family, graphdef, tx, tcfg):
  """step(state, batch, rng) -> (state, metrics); batch leaves are (grad_accum, micro_batch, length)."""
  schedule = lr_schedule(tcfg)

  def loss_fn(params, rest, micro, rng):
    return family.loss(nnx.merge(graphdef, params, rest), micro, rng)

  def step(state, batch, rng):
    params = state["params"]
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, xs):
      micro, i = xs
      (loss, metrics), grads = grad_fn(params, state["rest"], micro, jax.random.fold_in(rng, i))
      acc_grads, acc_loss, acc_metrics = carry
      add = lambda a, b: jax.tree.map(jnp.add, a, b)
      return (add(acc_grads, grads), acc_loss + loss, add(acc_metrics, metrics)), None

    n = tcfg.grad_accum
    first = jax.tree.map(lambda x: x[0], batch)
    zero_metrics = jax.tree.map(jnp.zeros_like, jax.eval_shape(loss_fn, params, state["rest"], first, rng)[1])
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    (grads, loss, metrics), _ = jax.lax.scan(accumulate, (zero_grads, jnp.zeros(()), zero_metrics),
                                             (batch, jnp.arange(n)))
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt = tx.update(grads, state["opt"], params)
    new_state = {"params": optax.apply_updates(params, updates), "rest": state["rest"], "opt": opt,
                 "step": state["step"] + 1}
    out = {"loss": loss / n, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"]), **metrics}
    return new_state, out

  return step


def make_eval_step(family, graphdef):
  """eval(params, rest, batch, rng) -> the family's loss metrics (sums) on one (batch, length) batch."""
  loss = getattr(family, "eval_loss", family.loss)  # a family may score held-out data differently (recurrent: fixed r)

  def evaluate(params, rest, batch, rng):
    return loss(nnx.merge(graphdef, params, rest), batch, rng)[1]
  return evaluate


def fixed_batch_runner(family, model_cfg, tcfg, batch, seed=0):
  """For benchmarks: (run, parameter count), where run(n) takes n jitted training steps (state donated) on one
  fixed batch and returns the last loss, blocking until it is computed."""
  tx = make_optimizer(tcfg)
  graphdef, state = init_state(family, model_cfg, tx, seed)
  fn = jax.jit(make_train_step(family, graphdef, tx, tcfg), donate_argnums=0)
  box = {"state": state}

  def run(n):
    out = None
    for i in range(n):
      box["state"], out = fn(box["state"], batch, jax.random.key(i))
    return float(jax.block_until_ready(out["loss"]))

  return run, sum(v.size for v in jax.tree.leaves(state["params"]))
