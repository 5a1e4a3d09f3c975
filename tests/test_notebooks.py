"""The interp notebooks: stored without outputs and as make_notebooks.py writes them; executed in quick mode
(nbclient, the venv's python3 kernel) in one shared run directory, each printing a JSON summary whose values must
be consistent with what the notebook computes."""

import json
import math
import os
import sys

import nbformat
import pytest

from altbench.interp.notebooks import make_notebooks

NB_DIR = os.path.dirname(make_notebooks.__file__)
ORDER = ("coconut_thoughts", "cot_faithfulness", "lenses_across_steps")  # later ones reuse earlier runs


def _read(name):
  return nbformat.read(os.path.join(NB_DIR, f"{name}.ipynb"), as_version=4)


def test_stored_notebooks_have_no_outputs_and_match_the_generator():
  assert set(make_notebooks.NOTEBOOKS) == set(ORDER)
  for name in ORDER:
    nb = _read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, (name, cell.id)
    made = make_notebooks.build(name)
    shape = lambda n: [(c.cell_type, c.source, c.metadata.get("tags")) for c in n.cells]
    assert shape(nb) == shape(made), f"{name}.ipynb differs from make_notebooks.py: rerun it"
    assert sum(c.metadata.get("tags") == ["summary"] for c in nb.cells) == 1
    assert nb.cells[-1].metadata.get("tags") == ["summary"]


def test_a_run_of_another_kind_is_refused_before_loading(tmp_path):
  from altbench.interp.notebooks import common
  from altbench.train import config
  cot = common.experiment_config("reasoning", "reach-cot-smoke")
  (tmp_path / "config.json").write_text(json.dumps({"config": config.to_dict(cot)}))
  with pytest.raises(ValueError, match=r"\('coconut', 'reach', 'cot'\) run; this notebook reads \('coconut', 'reach', 'coconut'\)"):
    common.train_or_load(common.experiment_config("reasoning", "reach-coconut-smoke"), "x", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no config.json"):
    common.train_or_load(cot, "x", str(tmp_path / "missing"))


def _execute(workdir):
  """Execute the notebooks in ORDER in one run directory; {name: the JSON its summary cell prints}."""
  import nbclient
  env = {**os.environ, "ALTBENCH_NOTEBOOK_QUICK": "1", "ALTBENCH_NOTEBOOK_WORKDIR": str(workdir),
         # a few training steps: compile time dominates, and XLA's backend optimisation is most of it
         "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
         "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
  out = {}
  for name in ORDER:
    nb = _read(name)
    # kernel "python3" is ipykernel's spec with argv "python": jupyter_client starts it as sys.executable
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": NB_DIR}})
    client.execute(env=env)
    cell = next(c for c in nb.cells if c.metadata.get("tags") == ["summary"])
    text = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
    out[name] = json.loads(text)
    out[name]["_images"] = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                               for o in c.outputs)
  return out


def test_notebooks_execute_in_quick_mode_with_consistent_summaries(tmp_path):
  # one test (not a module fixture): pytest -n 2 would execute the notebooks once per worker
  summaries = _execute(tmp_path)
  for name, s in summaries.items():
    assert s["notebook"] == name and s["quick"] is True
    assert os.path.realpath(s["python"]) == os.path.realpath(sys.executable)  # the venv's kernel, with jax
    assert s["_images"] >= 1, name  # the plots were drawn
  _check_coconut_thoughts(summaries["coconut_thoughts"])
  _check_cot_faithfulness(summaries["cot_faithfulness"])
  _check_lenses_across_steps(summaries["lenses_across_steps"])


def _unit(x):
  return 0.0 <= x <= 1.0


def _check_coconut_thoughts(s):
  K, n_layers = s["thoughts"], s["layers"]
  assert K == 3  # reach-smoke: depth 3, one thought per step
  # the thought vector's unembedding is the logit lens of the last block at the position it is read from
  assert s["lens_check"] < 1e-4
  assert sorted(s["lens"]) == [f"blocks.{i}" for i in range(n_layers)]
  for by_k in s["lens"].values():
    assert sorted(by_k) == [f"thought {k}" for k in range(K)]
    for v in by_k.values():
      assert abs(v["vocab_sum"] - 1.0) < 1e-4
      assert all(_unit(v[q]) for q in ("frontier", "unreachable", "wins", "p_gt")) and v["n"] > 0, v
  assert list(s["probe"]) == ["embed"] + [f"blocks.{i}.resid_post" for i in range(n_layers)]
  for by_k in s["probe"].values():
    for v in by_k.values():
      assert all(_unit(v[q]) for q in ("accuracy", "control_accuracy", "majority", "random_accuracy", "auroc")), v
      assert v["selectivity"] == pytest.approx(v["accuracy"] - v["control_accuracy"])
      lo, hi = v["selectivity_ci"]
      assert lo <= v["selectivity"] + 1e-9 and v["selectivity"] <= hi + 1e-9, v


def _check_cot_faithfulness(s):
  assert s["coconut"]["chain_length"] == 3 and s["recurrent"]["chain_length"] >= 1
  for name in ("cot", "coconut", "recurrent"):
    f, m = s[name]["summary"], s[name]["monitorability"]
    ea = f["early_answering"]
    if s[name]["chain_length"]:  # a fixed chain: answers after k = 0..n thoughts / iterations
      assert len(ea["same"]) == s[name]["chain_length"] + 1, name
    assert ea["same"][-1] == 1.0, name  # the whole chain gives the full-chain answer
    assert all(_unit(v) for v in ea["same"] + f["mistakes"]["changed"]) and _unit(ea["aoc"])
    assert len(f["mistakes"]["changed"]) == len(f["mistakes"]["count"])
    assert _unit(f["accuracy_full_chain"]) and _unit(f["accuracy_no_chain"])
    assert 0.0 <= m["score"] <= min(m["readable"], m["causal"]) <= 1.0, (name, m)
    assert m["n"] >= (0 if name == "cot" else 1), (name, m)  # latent chains have a fixed number of steps
  assert "filler" in s["cot"]["summary"] and "filler" in s["coconut"]["summary"]


def _check_lenses_across_steps(s):
  r = s["recurrent"]
  assert r["coda_check"] < 1e-4  # the coda lens after the last iteration is the model's output
  for read in ("logit lens", "tuned lens", "coda lens"):
    assert len(r[read]["kl"]) == r["iters"] and min(r[read]["kl"]) > -1e-5, read
    assert all(_unit(v) for v in r[read]["agree"] + r[read]["gold"])
  assert r["coda lens"]["kl"][-1] < 1e-5 and r["coda lens"]["agree"][-1] >= 0.95  # exact but for float near-ties
  assert r["tuned_loss"][1] <= r["tuned_loss"][0]  # the translator's fit lowers its KL from the logit lens's
  d = s["diffusion"]
  frac = d["masked_fraction"]
  assert len(frac) == d["steps"] and frac[0] == 0.5  # half of every window masked at the start
  assert all(a >= b for a, b in zip(frac, frac[1:])) and frac[-1] > 0.0  # revealed step by step, never re-masked
  assert d["revealed_agree"] > 0.98  # the sampler writes the last block's top token (two jits: float near-ties)
  assert 0.0 < d["constant_baseline"] <= 1.0
  assert d["tuned_loss"][1] <= d["tuned_loss"][0]
  for read in ("logit lens", "tuned lens"):
    assert sorted(d[read]) == [f"blocks.{i}" for i in range(d["blocks"])]
    for row in d[read].values():
      assert len(row["agree"]) == len(row["kl"]) == d["steps"]
      assert all(_unit(v) for v in row["agree"]) and all(v > -1e-5 for v in row["kl"] if not math.isnan(v))
  last = d["logit lens"][f"blocks.{d['blocks'] - 1}"]
  assert max(last["kl"]) < 1e-5  # the last block's read is the model's own distribution
