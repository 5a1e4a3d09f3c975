"""Probes, probe targets, faithfulness tests and the `altbench probe` command: planted features recovered and
controls at chance, early answering against the family's own decoding, a mistake that must change a
hand-made model's answer, the monitorability score against a hand count, and the CLI end to end."""

import numpy as np
import pytest

from interp import probes


def _planted(n=600, d=32, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n)
  types = rng.integers(0, 300, n)  # the control map's types, independent of the planted label
  x = rng.normal(size=(n, d)) + 2.0 * rng.normal(size=(classes, d))[labels]
  return x, labels, types, rng


def test_probe_recovers_a_planted_feature_and_its_control_stays_at_chance():
  x, labels, types, _ = _planted()
  r = probes.probe(x, labels, types, groups_N=np.arange(len(x)) // 3)
  assert r["accuracy"] > 0.95, r
  assert abs(r["control_accuracy"] - 0.2) < 0.1, r  # 5 classes: chance 0.2
  assert r["selectivity_ci"][0] > 0.6 and r["selectivity_ci"][0] <= r["selectivity"] <= r["selectivity_ci"][1]
  # without the feature the probe is at chance too (it cannot read labels from noise)
  noise = probes.probe(np.random.default_rng(1).normal(size=x.shape), labels, types)
  assert noise["accuracy"] < 0.35 and noise["selectivity_ci"][0] < 0.0 < noise["selectivity_ci"][1] + 0.05, noise


def test_control_task_is_a_fixed_map_of_the_type_that_a_probe_can_memorise():
  rng = np.random.default_rng(0)
  types = rng.integers(0, 8, 400)
  labels = rng.integers(0, 4, 400)
  control = probes.control_labels(types, labels, seed=3)
  for t in np.unique(types):
    assert len(set(control[types == t].tolist())) == 1
  # activations that encode the type (one-hot) make the control learnable: selectivity near 0 for a type-only
  # representation, which is what the control is for
  x = np.eye(8)[types] + 0.01 * rng.normal(size=(400, 8))
  r = probes.probe(x, control, types)
  assert r["accuracy"] > 0.95 and r["control_accuracy"] > 0.95, r


def test_ridge_recovers_a_planted_value():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 24))
  y = x @ rng.normal(size=24) + 3.0
  types = rng.integers(0, 250, 500)
  r = probes.probe(x, y, types, kind="value")
  assert r["r2"] > 0.99 and r["control_r2"] < 0.1, r
  noise = probes.probe(x, rng.normal(size=500), types, kind="value")
  assert noise["r2"] < 0.1, noise
