"""Linear probes with control tasks: what a layer's activations encode linearly, and how selectively.

A probe is a logistic (classes) or ridge (values) map from activations (n, d) to the target, trained with
optax on the full batch (Adam, a fixed number of steps, zero init: deterministic) on features standardised
with the training split's mean and std. Every probe is reported against its control task (Hewitt & Liang,
2019, "Designing and Interpreting Probes with Control Tasks"): the same inputs, labels drawn by a random but
fixed map from the item's *type* (for example the node a path step names) to a label, sampled from the
empirical label distribution. A probe that only memorises types does as well on the control as on the task;
selectivity = accuracy - control accuracy (R^2 - control R^2 for values) is what the representation adds.
With unbalanced classes that difference alone can mislead: a probe at the majority rate (it learned nothing)
shows selectivity > 0 whenever memorising types pulls the control below the majority rate (e.g. reach's
frontier membership, 86% "no"). So class probes also report above_majority = accuracy - majority rate, with
its interval; a claim that a layer encodes the target needs both intervals above 0. Binary probes also report
the area under the ROC curve of their margin (auroc, control_auroc, auroc_selectivity): at an 86% majority a
probe can rank the items well and still never cross 50% confidence, which accuracy cannot see.

A type-mapped control is degenerate when the probe's input names the type itself: a frontier-membership
probe must be told which node v it is asked about, so it learns "v -> label" exactly (control accuracy
0.97-1.0 on reach, measured) and every selectivity comes out negative. For such targets `control_x` gives
the control's *inputs* instead: the task's own labels on mismatched inputs (another example's activation
beside the same query), so the control keeps every type and label statistic and loses only the example.

Confidence intervals are a paired percentile bootstrap over held-out items (the probe and its control are
scored on the same resample, so the interval is for their difference), 95% by default. The held-out split is
by group (the example an item comes from), so steps of one example never straddle train and test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

PAD_ROWS = 128  # pad the item axis to a multiple of this (zero weight) so probes of similar size share a compile


def _pad(n):
  return -(-max(n, 1) // PAD_ROWS) * PAD_ROWS


def standardise(x_train_ND):
  mu = x_train_ND.mean(0)
  sd = x_train_ND.std(0) + 1e-6
  return mu, sd


@functools.partial(jax.jit, static_argnames=("n_out", "kind", "steps"))
def _fit(x_ND, y_SN, w_N, *, n_out, kind, steps, l2, lr):
  """Weights (S, d, n_out) and biases (S, n_out) of S probes on the same standardised inputs, one per label set."""
  d = x_ND.shape[1]
  n_eff = jnp.maximum(w_N.sum(), 1.0)

  def loss(params, y_N):
    out_NO = x_ND @ params["w"] + params["b"]
    if kind == "class":
      per_N = optax.softmax_cross_entropy_with_integer_labels(out_NO, y_N)
    else:
      per_N = jnp.sum(jnp.square(out_NO - y_N), axis=-1)
    return jnp.sum(per_N * w_N) / n_eff + l2 * jnp.sum(jnp.square(params["w"]))

  tx = optax.adam(lr)

  def one(y_N):
    params = {"w": jnp.zeros((d, n_out)), "b": jnp.zeros((n_out,))}
    if kind == "value":  # start at the mean so the ridge only learns the part the inputs explain
      params["b"] = jnp.sum(y_N * w_N[:, None], 0) / n_eff

    def step(carry, _):
      params, opt = carry
      g = jax.grad(loss)(params, y_N)
      upd, opt = tx.update(g, opt, params)
      return (optax.apply_updates(params, upd), opt), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params

  return jax.vmap(one)(y_SN)


def fit(x_ND, y_SN, kind, n_out, *, steps=300, l2=1e-3, lr=0.05):
  """S probes (stacked params, plus the standardisation) on x; y_SN: class ids (kind "class") or (S, n, k) values."""
  x = np.asarray(x_ND, np.float32)
  mu, sd = standardise(x)
  n = len(x)
  rows = _pad(n)
  xs = np.zeros((rows, x.shape[1]), np.float32)
  xs[:n] = (x - mu) / sd
  y = np.asarray(y_SN)
  ys = np.zeros((y.shape[0], rows) + y.shape[2:], y.dtype)
  ys[:, :n] = y
  w = np.zeros(rows, np.float32)
  w[:n] = 1.0
  params = _fit(jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(w), n_out=n_out, kind=kind, steps=steps,
                l2=float(l2), lr=float(lr))
  return {"w": np.asarray(params["w"]), "b": np.asarray(params["b"]), "mu": mu, "sd": sd}


def outputs(params, x_ND):
  """(S, n, n_out) logits (classes) or values of the S probes in params."""
  x = (np.asarray(x_ND, np.float32) - params["mu"]) / params["sd"]
  return np.einsum("nd,sdo->sno", x, params["w"]) + params["b"][:, None]


def predict(params, x_ND, kind):
  """(S, n) predicted classes or (S, n, k) values of the S probes in params."""
  out = outputs(params, x_ND)
  return out.argmax(-1) if kind == "class" else out


def auroc(score_N, label_N):
  """Area under the ROC curve of scores for binary labels (ties count half); 0.5 when one class is absent."""
  score_N, label_N = np.asarray(score_N, np.float64), np.asarray(label_N).astype(bool)
  n1, n0 = int(label_N.sum()), int((~label_N).sum())
  if n1 == 0 or n0 == 0:
    return 0.5
  order = np.argsort(score_N, kind="stable")
  ranks = np.empty(len(score_N))
  sorted_scores = score_N[order]
  # average ranks over ties (1-based)
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
  return float((ranks[label_N].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def control_labels(types_N, labels_N, seed=0):
  """Hewitt & Liang control task: each distinct type gets one label drawn from the empirical label
  distribution (a fixed random map type -> label, so the same type always has the same control label)."""
  types_N = np.asarray(types_N)
  labels_N = np.asarray(labels_N)
  uniq, inverse = np.unique(types_N, return_inverse=True)
  rng = np.random.default_rng(seed)
  drawn = labels_N[rng.integers(len(labels_N), size=len(uniq))]
  return drawn[inverse.reshape(-1)]


def split(groups_N, test_frac=0.25, seed=0):
  """Boolean train mask: a random test_frac of the groups held out (at least one group on each side)."""
  groups_N = np.asarray(groups_N)
  uniq = np.unique(groups_N)
  if len(uniq) < 2:
    raise ValueError(f"probe split: {len(uniq)} group(s); need at least 2 to hold some out")
  rng = np.random.default_rng(seed)
  n_test = min(max(1, int(round(test_frac * len(uniq)))), len(uniq) - 1)
  test = set(rng.permutation(uniq)[:n_test].tolist())
  return np.array([g not in test for g in groups_N.tolist()])


def _r2(pred_NK, y_NK):
  ss_res = np.sum(np.square(pred_NK - y_NK))
  ss_tot = np.sum(np.square(y_NK - y_NK.mean(0)))
  return 1.0 - ss_res / max(ss_tot, 1e-12)


def _bootstrap(score, n, n_boot, seed, level=0.95):
  """Percentile interval of score(index array) over n_boot resamples of range(n) with replacement."""
  rng = np.random.default_rng(seed)
  vals = np.array([score(rng.integers(n, size=n)) for _ in range(n_boot)])
  lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
  return [float(lo), float(hi)]


def probe(x_ND, labels_N, types_N, groups_N=None, *, kind="class", n_classes=None, control_x=None, seed=0,
          n_boot=500, test_frac=0.25, steps=300, l2=1e-3, lr=0.05):
  """Train a probe and its control task on the same inputs; held-out scores with a paired bootstrap interval.

  kind "class": labels_N ints in [0, n_classes); reports accuracy, control_accuracy, selectivity and
  `majority` (the held-out rate of the most frequent training label, the chance level to compare with).
  kind "value": labels_N floats (n,) or (n, k); reports r2, control_r2 and selectivity (their difference).
  types_N: the item's type for the control map. control_x (n, d): the control's inputs instead (trained on the
  task's labels; see the module docstring); types_N is then unused. groups_N: items of one group are held out
  together (default: every item its own group). Returns a dict of floats and lists (JSON-ready) plus `correct`
  (held-out per-item hits of the probe, for the monitorability score) and `test_mask`.
  """
  x = np.asarray(x_ND, np.float32)
  labels = np.asarray(labels_N)
  n = len(x)
  if x.ndim != 2 or len(labels) != n or len(types_N) != n:
    raise ValueError(f"probe: x {x.shape}, labels {labels.shape}, types {np.shape(types_N)}: need (n, d), (n, ...) "
                     "and (n,) with the same n")
  if kind not in ("class", "value"):
    raise ValueError(f"probe kind={kind!r}: valid: 'class', 'value'")
  groups = np.arange(n) if groups_N is None else np.asarray(groups_N)
  train = split(groups, test_frac, seed)
  test = ~train
  if control_x is not None and np.shape(control_x) != x.shape:
    raise ValueError(f"probe: control_x {np.shape(control_x)} must have the inputs' shape {x.shape}")
  control = labels if control_x is not None else control_labels(types_N, labels, seed)
  if kind == "class":
    n_classes = int(n_classes or labels.max() + 1)
    if labels.min() < 0 or labels.max() >= n_classes:
      raise ValueError(f"probe labels in [{labels.min()}, {labels.max()}]: need [0, n_classes={n_classes})")
    y = np.stack([labels, control]).astype(np.int32)
    n_out = n_classes
  else:
    y = np.stack([labels, control]).astype(np.float32)
    if y.ndim == 2:
      y = y[..., None]
    n_out = y.shape[-1]
  kw = dict(steps=steps, l2=l2, lr=lr)
  if control_x is None:
    out_SMO = outputs(fit(x[train], y[:, train], kind, n_out, **kw), x[test])
  else:
    xc = np.asarray(control_x, np.float32)
    out_SMO = np.concatenate([outputs(fit(x[train], y[:1, train], kind, n_out, **kw), x[test]),
                              outputs(fit(xc[train], y[1:, train], kind, n_out, **kw), xc[test])])
  pred = out_SMO.argmax(-1) if kind == "class" else out_SMO
  yt = y[:, test]
  m = int(test.sum())
  out = {"kind": kind, "n_train": int(train.sum()), "n_test": m, "ci_method": f"paired percentile bootstrap over "
         f"held-out items, {n_boot} resamples, 95%", "control": "types" if control_x is None else "inputs"}
  if kind == "class":
    hit = pred == yt  # (2, m)
    values, counts = np.unique(labels[train], return_counts=True)
    major = labels[test] == values[counts.argmax()]  # the majority-class guess's hits on the held-out items
    acc = lambda idx: hit[0, idx].mean()
    sel = lambda idx: hit[0, idx].mean() - hit[1, idx].mean()
    above = lambda idx: hit[0, idx].mean() - major[idx].mean()
    out.update(accuracy=float(hit[0].mean()), control_accuracy=float(hit[1].mean()),
               selectivity=float(hit[0].mean() - hit[1].mean()), majority=float(major.mean()),
               above_majority=float(hit[0].mean() - major.mean()),
               accuracy_ci=_bootstrap(acc, m, n_boot, seed), selectivity_ci=_bootstrap(sel, m, n_boot, seed),
               above_majority_ci=_bootstrap(above, m, n_boot, seed))
    if n_classes == 2:
      margin = out_SMO[..., 1] - out_SMO[..., 0]
      roc = lambda s, idx: auroc(margin[s, idx], yt[s, idx])
      everything = np.arange(m)
      out.update(auroc=roc(0, everything), control_auroc=roc(1, everything),
                 auroc_selectivity=roc(0, everything) - roc(1, everything),
                 auroc_ci=_bootstrap(lambda idx: roc(0, idx), m, n_boot, seed),
                 auroc_selectivity_ci=_bootstrap(lambda idx: roc(0, idx) - roc(1, idx), m, n_boot, seed))
    correct = hit[0]
  else:
    r2 = lambda s, idx: _r2(pred[s, idx], yt[s, idx])
    out.update(r2=float(r2(0, np.arange(m))), control_r2=float(r2(1, np.arange(m))),
               selectivity=float(r2(0, np.arange(m)) - r2(1, np.arange(m))),
               r2_ci=_bootstrap(lambda idx: r2(0, idx), m, n_boot, seed),
               selectivity_ci=_bootstrap(lambda idx: r2(0, idx) - r2(1, idx), m, n_boot, seed))
    # a value item counts as recovered when every rounded output equals the rounded target
    correct = np.all(np.round(pred[0]) == np.round(yt[0]), axis=-1)
  out["correct"] = correct
  out["test_mask"] = test
  return out


def json_ready(result):
  """The probe() dict without its per-item arrays."""
  return {k: v for k, v in result.items() if k not in ("correct", "test_mask")}
