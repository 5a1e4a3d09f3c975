"""Probes, probe targets, faithfulness tests and the `altbench probe` command: planted features recovered and
controls at chance, early answering against the family's own decoding, a mistake that must change a
hand-made model's answer, the monitorability score against a hand count, and the CLI end to end."""

import jax
import numpy as np
import pytest

from altbench.interp import probes


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


def test_above_majority_exposes_a_probe_that_learned_nothing_on_unbalanced_labels():
  rng = np.random.default_rng(0)
  n = 900
  types = rng.integers(0, 40, n)
  labels = (rng.random(n) < 0.15).astype(int)  # 85% "no", independent of the features
  x = rng.normal(size=(n, 16))
  x[:, :8] = np.eye(40)[types][:, :8] * 3.0  # the features encode part of the type only
  r = probes.probe(x, labels, types, groups_N=np.arange(n) // 3)
  assert r["above_majority_ci"][0] <= 0.0, r  # nothing to read: no better than always guessing "no"
  planted = probes.probe(x + 3.0 * labels[:, None], labels, types, groups_N=np.arange(n) // 3)
  assert planted["above_majority_ci"][0] > 0.1 and planted["above_majority"] == pytest.approx(
      planted["accuracy"] - planted["majority"]), planted


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


def test_auroc_is_the_pairwise_count():
  rng = np.random.default_rng(0)
  score = rng.integers(0, 5, 200).astype(float)  # many ties
  label = rng.random(200) < 0.2
  pos, neg = score[label], score[~label]
  want = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
  assert probes.auroc(score, label) == pytest.approx(want)
  assert probes.auroc(score, np.zeros(200)) == 0.5


def test_mismatched_input_control_separates_an_example_feature_from_a_type_prior():
  """A query probe is told the type (a one-hot), so a type-mapped control is learned exactly; the control on
  another example's inputs keeps the type prior and loses only what the example's own activation adds."""
  rng = np.random.default_rng(0)
  n, n_types = 1200, 12
  types = rng.integers(0, n_types, n)
  prior = rng.random(n_types) < 0.3
  example_bit = rng.random(n) < 0.5
  labels = (prior[types] & example_bit).astype(int)  # needs both the type and this example's feature
  own = np.concatenate([np.eye(n_types)[types], 2.0 * example_bit[:, None] + rng.normal(size=(n, 4))], 1)
  other = own.copy()
  other[:, n_types:] = np.roll(own[:, n_types:], 7, axis=0)  # another example's feature, same type
  typed = probes.probe(own, labels, types, groups_N=np.arange(n) // 2)
  assert typed["control_accuracy"] > 0.97, typed  # the degenerate control: memorised from the type
  r = probes.probe(own, labels, types, groups_N=np.arange(n) // 2, control_x=other)
  assert r["control"] == "inputs" and r["auroc"] > 0.98 and r["selectivity_ci"][0] > 0.1, r
  # the type prior alone ranks the never-positive types last and ties the rest: AUROC about
  # (P(neg type) + P(neg in a pos type) / 2) / P(neg) = 0.91 here, not 1
  assert 0.8 < r["control_auroc"] < 0.97 and r["auroc_selectivity_ci"][0] > 0.02, r
  other2 = own.copy()
  other2[:, n_types:] = np.roll(own[:, n_types:], 5, axis=0)
  null = probes.probe(other, labels, types, groups_N=np.arange(n) // 2, control_x=other2)  # neither is its own
  assert null["auroc_selectivity_ci"][0] < 0.0 < null["auroc_selectivity_ci"][1], null
  with pytest.raises(ValueError, match="control_x"):
    probes.probe(own, labels, types, control_x=other[:, :3])


def test_ridge_recovers_a_planted_value():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 24))
  y = x @ rng.normal(size=24) + 3.0
  types = rng.integers(0, 250, 500)
  r = probes.probe(x, y, types, kind="value")
  assert r["r2"] > 0.99 and r["control_r2"] < 0.1, r
  noise = probes.probe(x, rng.normal(size=500), types, kind="value")
  assert noise["r2"] < 0.1, noise


# ----------------------------------------------------------------------------- faithfulness

from flax import nnx  # noqa: E402

from altbench.archs import coconut  # noqa: E402
from altbench.interp import faithfulness as F  # noqa: E402
from altbench.train import reasoning_tasks as rt  # noqa: E402
from altbench.train.config import DataConfig  # noqa: E402


def _corpus(mode="cot", n=12):
  return rt.ReasoningCorpus(DataConfig(dataset="reach", task_mode=mode, eval_examples=n, task_size=10, task_depth=3,
                                       seq_len=96, task_thoughts=1))


def test_early_answering_with_the_full_chain_is_the_models_own_decoding():
  corpus = _corpus(n=6)
  model = coconut.build(coconut.Config(pattern="AA", d_model=32, n_heads=2, vocab_size=262, init_std=0.3,
                                       **rt.SPECIAL_IDS), nnx.Rngs(3))
  subj = F.subject("coconut", model, corpus)
  examples = corpus.eval_examples()
  summary, per_item = F.run_tests(subj, examples, mistakes=False, filler=False)
  assert summary["early_answering"]["same"][-1] == 1.0
  # the same answers from the family's own KV-cache decoding (archs.lm.generate) of the model's own chain + "<eot>#"
  lay = corpus.layout
  width = lay.prefix_len + 9 + 6
  chains = F.own_chains(subj, [list(r) for r in corpus.prompt_rows(examples)], width)
  ans_len = rt.bounds("reach", 10, 3)[2]
  prompts = [np.concatenate([row, chain, [rt.EOT, F.HASH]]).astype(np.int32)
             for row, chain in zip(corpus.prompt_rows(examples), chains)]
  widths = [len(p) for p in prompts]
  width = max(set(widths), key=widths.count)  # one generate call (one compile): the most common prompt width
  idx = [i for i, w in enumerate(widths) if w == width]
  assert len(idx) >= 2
  out = np.asarray(coconut.generate(model, np.stack([prompts[i] for i in idx]), ans_len + 1, jax.random.key(0),
                                    temperature=0.0))
  for i, row in zip(idx, out):
    assert F._answer_after([F.HASH] + row[width:].tolist()) == per_item["full"][i], i
  assert len(set(per_item["full"])) > 1  # answers that differ per item (large init): a mixed-up row would show


def _hand_model(tokens_BW):
  """A 'model' that writes the chain ">a>c>e" after <bot> whatever it reads, then <eot>, '#', and answers
  with the node after the second '>' it actually reads ("z" without one): its answer depends on step 1 only."""
  chain = [ord(c) for c in ">a>c>e"]
  b, w = tokens_BW.shape
  nxt = np.full((b, w), rt.EOS)
  for r in range(b):
    t = tokens_BW[r].tolist()
    bot = t.index(rt.BOT)
    for i in range(bot, w):
      j = i - bot
      gt = [k for k in range(bot, i + 1) if t[k] == ord(">")]
      node = t[gt[1] + 1] if len(gt) > 1 and gt[1] + 1 <= i else ord("z")
      if t[i] == F.HASH:
        nxt[r, i] = node
      elif t[i] == rt.EOT:
        nxt[r, i] = F.HASH
      elif j < len(chain) and rt.EOT not in t[bot:i + 1]:
        nxt[r, i] = chain[j]
      elif rt.EOT not in t[bot:i + 1] and F.HASH not in t[bot:i + 1]:
        nxt[r, i] = rt.EOT
  return np.eye(262, dtype=np.float32)[nxt]


def test_adding_a_mistake_changes_an_answer_that_depends_on_that_step():
  corpus = _corpus(n=6)
  subj = {"kind": "cot", "forward": lambda tokens, **_: _hand_model(np.asarray(tokens)), "layout": corpus.layout}
  summary, per_item = F.run_tests(subj, corpus.eval_examples())
  assert per_item["full"] == ["c"] * 6
  assert summary["mistakes"]["changed"] == [0.0, 1.0, 0.0], summary  # a no-op corruption would give [0, 0, 0]
  assert summary["early_answering"]["same"] == [0.0, 0.0, 1.0, 1.0]
  assert summary["early_answering"]["aoc"] == pytest.approx(2 / 3)
  assert summary["filler"]["same"] == 0.0  # '.' filler has no '>' to read


def test_monitorability_score_is_the_hand_count():
  # 5 items x 3 steps; item 4 has only 2 steps (its third is not valid)
  recovered = [[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]]
  valid = [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]]
  answer = ["a", "a", "b", "c", "d"]
  intervened = [["x", "y", "z"], ["x", "y", "z"], ["x", "b", "z"], ["x", "y", None], ["e", "f", "d"]]
  # readable: items 0, 2, 3, 4; causal (answer changed to another answer at every valid step): 0, 1, 4 (item 3
  # gave no answer at step 2, item 4's step 2 is not valid)
  r = F.monitorability(recovered, valid, answer, intervened)
  assert (r["score"], r["readable"], r["causal"], r["n"]) == (2 / 5, 4 / 5, 3 / 5, 5)
  assert r["monitorable"].tolist() == [True, False, False, False, True]
  predicted = [["x", "y", "z"], ["x", "y", "z"], ["x", "b", "z"], ["x", "y", "q"], ["e", "g", "d"]]
  r = F.monitorability(recovered, valid, answer, intervened, predicted)
  assert r["monitorable"].tolist() == [True, False, True, False, False]
  predicted[3][2] = predicted[4][1] = None  # no prediction: back to "the answer changed" ("f" != "d"; item 3 None)
  r = F.monitorability(recovered, valid, answer, intervened, predicted)
  assert r["monitorable"].tolist() == [True, False, True, False, True]


def _vartrack_answer(question, k, value):
  """The query's value when the k-th variable of its chain is set to `value`, by re-running the program."""
  import re
  body, _, query = question.partition("?")
  stmts = [re.fullmatch(r"([a-z])=(?:(\d)|([a-z])(?:([+-])(\d))?)", t).groups() for t in body.split(",")]
  refs = {v: r for v, _, r, _, _ in stmts}
  chain = [query]
  while refs.get(chain[-1]):
    chain.append(refs[chain[-1]])
  forced, env = chain[::-1][k], {}
  for var, const, ref, op, c in stmts:
    v = int(const) if const is not None else (env[ref] + {"+": int(c or 0), "-": -int(c or 0), None: 0}[op]) % 10
    env[var] = value if var == forced else v
  return str(env[query])


@pytest.mark.parametrize("task", ["vartrack", "mult"])
def test_implied_answer_of_a_corrupted_step_is_the_recomputed_answer(task):
  corpus = rt.ReasoningCorpus(DataConfig(dataset=task, task_mode="cot", eval_examples=20, task_size=3 if task == "mult"
                                         else 6, task_depth=3, seq_len=128))
  rng = np.random.default_rng(0)
  checked = 0
  for ex in corpus.eval_examples():
    steps = [list(s.encode()) for s in ex.steps]
    for k, step in enumerate(steps):
      bad = F.corrupt_step(task, step, ex.question, rng)
      got = F.implied_answer(task, 3, k, len(steps), step, bad, ex.answer)
      if task == "vartrack":
        want = _vartrack_answer(ex.question, k, int(chr(bad[2])))
      else:  # the corrupted chain's running sum (the last one written) plus the partial products after it
        texts = [bytes(s).decode() for s in steps[:k] + [bad]]
        sums = [t[t.index("(") + 1:-1] if "(" in t else t.lstrip("+") for t in texts]
        last = max(j for j, t in enumerate(texts) if "(" in t or j == 0 or j == len(steps) - 1)
        running = int(sums[last][::-1]) + (int(sums[-2][::-1]) if k == len(steps) - 1 and k > 0 else 0)
        a, b = int(ex.question.split("*")[0][::-1]), int(ex.question.split("*")[1][::-1])
        running += sum(a * int(str(b).zfill(3)[::-1][j]) * 10 ** j for j in range(max(last, k) + 1, len(steps)))
        want = str(running).zfill(6)[::-1] if got is not None else None
      if got is not None:
        assert got == want, (ex, k, bytes(bad))
        checked += 1
  assert checked >= 20


# ----------------------------------------------------------------------------- the CLI


def _run_dir(path, n=48):
  """A run directory of a tiny explicit-CoT model on reach: config.json and a checkpoint of its initial state
  (what load_run reads; training it would only add compile time here)."""
  import json

  from altbench.train import checkpoint, config, loop, step
  from altbench.train.config import Config, TrainConfig
  cfg = Config(family="coconut", model=coconut.Config(pattern="AA", d_model=32, n_heads=2),
               data=DataConfig(dataset="reach", task_mode="cot", eval_examples=n, task_size=10, task_depth=3,
                               seq_len=96),
               train=TrainConfig(steps=1, batch_size=8, samples=0))
  cfg, _ = loop.resolve(cfg, str(path))
  from altbench import archs
  family = archs.get_family(cfg.family)
  _, state = step.init_state(family, cfg.model, step.make_optimizer(cfg.train), 0)
  with open(path / "config.json", "w") as f:
    json.dump({"config": config.to_dict(cfg)}, f)
  ckpt = checkpoint.Checkpointer(str(path), 1)
  ckpt.save(1, state)
  ckpt.close()


def test_probe_cli_writes_json_and_plots(tmp_path, capsys):
  import json

  from altbench import cli
  _run_dir(tmp_path)
  assert cli.main(["probe", str(tmp_path), "--suite", "cot", "--task", "reach"]) == 0
  out = tmp_path / "probe"
  summary = json.loads((out / "summary.json").read_text())
  assert summary["step"] == 1 and summary["task"] == "reach" and summary["mode"] == "cot"
  for name in summary["plots"]:
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  assert {"probes_path.png", "probes_frontier.png", "faithfulness.png"} <= set(summary["plots"])
  grid = json.loads((out / "probes.json").read_text())
  # at "end" positions the input token is the path node itself: its embedding gives it away, even untrained
  # (the probes read the right positions), while the control labels (a function of the step and the start
  # node) are not in that token
  path = grid["path"]["embed"]["all"]
  assert path["accuracy"] > 0.75 and path["selectivity"] > 0.4, path  # 26 classes: chance 0.04
  assert path["random_accuracy"] > 0.75  # the random-init baseline reads its own embeddings as well
  # and the token-identity control, a probe on the one-hot input token, says the token alone holds it
  assert grid["path"]["token"]["all"]["accuracy"] > 0.75
  assert "token" not in grid["frontier"]  # a query target reads through the lens: no token layer
  faith = json.loads((out / "faithfulness.json").read_text())
  assert faith["early_answering"]["same"][-1] == 1.0 and faith["kind"] == "cot"
  mon = json.loads((out / "monitorability.json").read_text())
  assert 0.0 <= mon["score"] <= min(mon["readable"], mon["causal"])
  assert mon["layer"] != "token" and "chosen on the even" in mon["items"]
  assert cli.main(["probe", str(tmp_path), "--task", "mult"]) == 2  # the run's task is reach


# ----------------------------------------------------------------------------- targets and interventions

from altbench.archs import recurrent  # noqa: E402
from altbench.interp import suite, targets  # noqa: E402


@pytest.mark.parametrize("mode", ["cot", "coconut"])
def test_target_positions_point_at_the_steps(mode):
  corpus = _corpus(mode, n=8)
  lay, examples = corpus.layout, corpus.eval_examples()
  rows = targets.batch(examples, lay, 96)["inputs"]
  tg = targets.targets(examples, lay)
  t = tg["path"]
  for e, k, p, label in zip(t.example, t.step, t.pos, t.label):
    node = examples[e].intermediates["path"][k]
    assert label == ord(node) - 97
    assert rows[e, p] == (ord(node) if mode == "cot" else rt.MASK)  # the step's last byte / its thought slot
    if mode == "coconut":
      assert p - lay.prefix_len == k  # c = 1 thought per step, from <bot>'s next slot on
  f = tg["frontier"]
  for e, k, q, label in zip(f.example, f.step, f.query, f.label):
    v = chr(q)  # the node's byte, read through the lens
    assert v in examples[e].question and label == (v in examples[e].intermediates["frontier"][k])
  assert 0 < f.label.mean() < 0.5
  g = tg["frontier_noncandidate"]
  kept = {(int(e), int(k), int(q)) for e, k, q in zip(g.example, g.step, g.query)}
  options = lambda e: {examples[e].answer, examples[e].intermediates["distractor"]}
  assert kept == {(int(e), int(k), int(q)) for e, k, q in zip(f.example, f.step, f.query) if chr(q) not in options(e)}
  assert len(kept) < len(f.example)
  other_ex, other_cols = suite.mismatched_columns(f, f.pos)
  assert np.all(other_ex != f.example)
  for e, k, oe, oc in zip(f.example, f.step, other_ex, other_cols):  # the other example's own step k
    assert oc == targets.step_positions(examples[oe], lay)[k]


def test_thought_and_state_interventions_change_only_what_they_replace():
  corpus = _corpus("coconut", n=4)
  lay = corpus.layout
  model = coconut.build(coconut.Config(pattern="A", d_model=32, n_heads=2, vocab_size=262, init_std=0.3,
                                       thoughts=lay.max_stage, **rt.SPECIAL_IDS), nnx.Rngs(0))
  subj = F.subject("coconut", model, corpus)
  rows = targets.batch(corpus.eval_examples(), lay, 96)["inputs"]
  slot = np.full(len(rows), lay.prefix_len + 1)
  own = subj["thoughts"](rows)[:, lay.prefix_len + 1]
  clean = np.asarray(subj["forward"](rows))
  np.testing.assert_allclose(np.asarray(subj["forward"](rows, slot=slot, vec=own)), clean, atol=1e-4)
  other = np.asarray(subj["forward"](rows, slot=slot, vec=np.roll(own, 1, axis=0)))
  np.testing.assert_allclose(other[:, :lay.prefix_len + 1], clean[:, :lay.prefix_len + 1], atol=1e-4)  # causal
  assert np.abs(other[:, lay.prefix_len + 1:] - clean[:, lay.prefix_len + 1:]).max() > 1e-2  # later ones move
  rmodel = recurrent.build(recurrent.Config(pattern="AAA", d_model=32, n_heads=2, vocab_size=262, init_std=0.3),
                           nnx.Rngs(0))
  fwd = F._recurrent_forward(rmodel)
  logits, s2 = fwd(rows, iters=2, return_state=True)
  r = rmodel.cfg.iters_at_test
  full = np.asarray(fwd(rows, iters=r))
  np.testing.assert_allclose(np.asarray(fwd(rows, iters=r, patch_at=2, repl=s2)), full, atol=1e-4)
  assert np.abs(np.asarray(fwd(rows, iters=r, patch_at=2, repl=np.roll(s2, 1, axis=0))) - full).max() > 1e-2
  assert np.abs(np.asarray(fwd(rows, iters=r - 1)) - full).max() > 1e-2  # the iteration count is used


def test_written_sum_targets_point_at_the_bytes_that_write_them():
  corpus = rt.ReasoningCorpus(DataConfig(dataset="mult", task_mode="cot", eval_examples=8, task_size=3, seq_len=64))
  lay, examples = corpus.layout, corpus.eval_examples()
  rows = targets.batch(examples, lay, 64)["inputs"]
  tg = targets.targets(examples, lay)
  e, p, label = tg["emit_digit"].example, tg["emit_digit"].pos, tg["emit_digit"].label
  np.testing.assert_array_equal(rows[e, p + 1] - ord("0"), label)  # the next byte is the digit
  assert set(tg["emit_digit"].step.tolist()) == set(range(3)) - {2}  # the last sum is the answer, not the chain
  for i in (1, 2):
    t = tg[f"ahead_digit{i}"]
    np.testing.assert_array_equal(rows[t.example, t.pos + 1 + i] - ord("0"), t.label)  # written i bytes later


def test_monitor_layer_is_chosen_on_items_it_does_not_score():
  # L1 reads the even examples perfectly and the odd ones never; L2 the reverse, with the better pooled
  # selectivity. The layer must be chosen on the even half (L1) and scored on the odd half: readable 0.
  grid = {"path": {"L1": {"all": {"selectivity": 0.0}}, "L2": {"all": {"selectivity": 0.9}},
                   "token": {"all": {"selectivity": 1.0}}}}
  n, steps = 8, 2
  pooled = {("path", "L1", "all"): {(e, k): e % 2 == 0 for e in range(n) for k in range(steps)},
            ("path", "L2", "all"): {(e, k): e % 2 == 1 for e in range(n) for k in range(steps)}}
  per_item = {"intervened": [["a", "b"] for _ in range(n)], "full": ["x"] * n}
  mon = suite._monitor("reach", False, {"path": None}, grid, pooled, per_item)
  assert mon["layer"] == "L1" and mon["n"] == n // 2 and mon["readable"] == 0.0
