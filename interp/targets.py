"""Probe targets from the reasoning tasks' ground truth: for a batch encoded as the training loop encodes it,
where each CoT step or continuous thought sits and what its intermediate is.

Rows are train/reasoning_tasks.encode_rows rows (<bot> at prefix_len - 1, the final Coconut stage). The
position of step k (0-based) with at="end" is where the step has been read in:
  cot      the last byte of step k's text (after it the model has written the step),
  coconut  the last of the c thought slots standing for step k, P + (k + 1) c - 1 (its input is the thought
           fed back for step k; its output is the next thought),
  others   (nocot, pause, filler: no chain) the position of "#", which predicts the answer: every step's target
           is probed there (for recurrent depth, across recurrences instead of steps).
With at="before" it is the position one earlier in cot/coconut (the one that predicts step k's first byte
or computes its first thought): probing there asks whether the intermediate exists before it is written.

Targets (class labels; `types` name the entity the control task maps to a random label):
  reach     path: the path node at step k (its letter, 0..25); type: (step k, the start node), what a probe
            could read without following the graph.
            frontier: one item per (step k, node v of the graph), label 1 when v is in the BFS frontier at
            step k (the nodes at distance k + 1 from the start); its input is the activation at step k read
            through the logit lens for v (`query`, lens.readout_terms: final_norm(h) times the head's row for
            v, which sums to the lens logit of v), so one d-wide probe asks about every node; control: the
            same probe on another example's activation at step k (probes' `control_x`: a type-mapped
            control is learned exactly by any probe that is told v); type: the node.
            frontier_noncandidate: the same without the question's two answer options as v (the last
            frontier usually holds the answer: does the thought hold more of the frontier than that?)
  mult      sum_digit{i}: digit i (least significant first) of the running sum after partial product k;
            type: (k, the multiplier digit b_k), i.e. what the step reads from the question
  vartrack  value: the chain variable's value at step k (0..9); type: the variable's letter
mult, cot layout only, at the positions where the chain writes its running sums (`written_sum_targets`):
            emit_digit: digit i of the sum after partial product k at the position that predicts that digit
            (its byte's position - 1), pooled over i; type: (k, i), the chain slot, which position alone
            tells a probe. At the last block a probe there reads the model's own next-token prediction (that
            digit, whenever the chain is right), so its accuracy is close to tautological: read the earlier
            blocks. ahead_digit{i} (i >= 1): digit i at the position that predicts digit 0, before
            any of that sum is written: does the model hold the whole sum ahead of writing it? type: (k, b_k).
            Only sums written inside the chain count (step 0's partial product and the "(...)" of the
            middle steps; the last sum is the answer).
"""

import dataclasses

import numpy as np

from altbench.train import reasoning_tasks as rt


@dataclasses.dataclass
class Target:
  """Items of one target: example row, step, token position, label and control type, each (n,)."""
  name: str
  n_classes: int
  example: np.ndarray
  step: np.ndarray
  pos: np.ndarray
  label: np.ndarray
  type: np.ndarray
  query: np.ndarray = None  # a token id the activation is read for (frontier membership: the node's byte)


def step_positions(ex, lay, at="end"):
  """Token positions (in the model's input row) of each CoT step / thought of ex under layout lay."""
  if at not in ("end", "before"):
    raise ValueError(f"at={at!r}: valid: 'end', 'before'")
  p = lay.prefix_len
  shift = 0 if at == "end" else -1
  if lay.mode == "cot":
    ends = np.cumsum([len(s) for s in ex.steps]) - 1
    if at == "before":
      ends = np.concatenate([[-1], ends[:-1]]) + 1  # the first byte of step k, whose position is read one back
    return [int(p + e + shift) for e in ends]
  if lay.mode == "coconut":
    c = lay.thoughts
    first = 1 if at == "end" else 0
    return [int(p + (k + first) * c - 1) for k in range(min(len(ex.steps), lay.max_stage))]
  _, tail, _ = rt.encode(ex, lay.mode, pause=lay.pause, stage=lay.max_stage, thoughts=lay.thoughts,
                         max_stage=lay.max_stage)
  return [p + tail.index(ord("#"))] * len(ex.steps)


def _node(name):
  return ord(name) - 97


def step_labels(ex):
  """{target name: (labels per step, types per step, n_classes)} for one example."""
  if ex.task == "reach":
    path, start = ex.intermediates["path"], _node(ex.intermediates["start"])
    return {"path": ([_node(v) for v in path], [26 * k + start for k in range(len(path))], 26)}
  if ex.task == "mult":
    b = ex.question.split("*")[1]
    sums = ex.intermediates["running_sum_digits"]
    out = {}
    for i in range(len(sums[-1])):
      labels = [s[i] if i < len(s) else -1 for s in sums]  # -1: that sum has no digit i (no item)
      out[f"sum_digit{i}"] = (labels, [10 * k + int(b[k]) for k in range(len(sums))], 10)
    return out
  if ex.task == "vartrack":
    chain = ex.intermediates["chain"]
    return {"value": ([v for _, v in chain], [ord(c) - 97 for c, _ in chain], 10)}
  raise ValueError(f"task={ex.task!r}: no probe targets (valid: reach, mult, vartrack)")


def frontier(examples, lay, at="end", candidates=True):
  """The reach `frontier` Target: (example, step k, node v) items, v's byte in `query`. candidates=False
  leaves out the question's two answer options (`frontier_noncandidate`): the last frontier usually holds the
  answer, so a thought that only holds its answer already scores on the full target."""
  rows = []
  for row, ex in enumerate(examples):
    pos = step_positions(ex, lay, at)
    skip = set() if candidates else {ex.answer, ex.intermediates["distractor"]}
    nodes = sorted(set(c for c in ex.question if c.isalpha()) - skip)
    for k, members in enumerate(ex.intermediates["frontier"][:len(pos)]):
      for v in nodes:
        rows.append((row, k, pos[k], int(v in members), _node(v), ord(v)))
  cols = np.array(rows, np.int64).reshape(-1, 6).T
  return Target("frontier" if candidates else "frontier_noncandidate", 2, *cols[:5], query=cols[5])


def written_sums(ex):
  """[(step k, chain offset of the sum's first digit, its digits)] for the running sums a mult chain writes."""
  out, offset = [], 0
  for k, (text, digits) in enumerate(zip(ex.steps, ex.intermediates["running_sum_digits"])):
    start = 0 if k == 0 else text.find("(") + 1  # step k >= 1: "+<partial product>(<running sum>)"
    if k == 0 or start > 0:
      out.append((k, offset + start, digits))
    offset += len(text)
  return out


def written_sum_targets(examples, lay):
  """{"emit_digit", "ahead_digit{i}": Target} of mult chains under the cot layout (see the module docstring)."""
  emit, ahead = [], {}
  for row, ex in enumerate(examples):
    b = ex.question.split("*")[1]
    for k, start, digits in written_sums(ex):
      first = lay.prefix_len + start - 1  # predicts digit 0
      for i, d in enumerate(digits):
        emit.append((row, k, first + i, d, 100 * k + i))
        if i:
          ahead.setdefault(i, []).append((row, k, first, d, 10 * k + int(b[k])))
  out = {"emit_digit": _target("emit_digit", 10, emit)}
  out.update({f"ahead_digit{i}": _target(f"ahead_digit{i}", 10, r) for i, r in sorted(ahead.items())})
  return out


def _target(name, n_classes, rows):
  """A Target from (example, step, pos, label, type) rows."""
  return Target(name, n_classes, *np.array(rows, np.int64).reshape(-1, 5).T)


def targets(examples, lay, at="end"):
  """{name: Target} over the examples (row i of the batch = examples[i]) under layout lay."""
  acc = {}
  for row, ex in enumerate(examples):
    pos = step_positions(ex, lay, at)
    for name, (labels, types, n_classes) in step_labels(ex).items():
      items = acc.setdefault(name, {"n_classes": n_classes, "rows": []})
      for k in range(len(pos)):
        if labels[k] >= 0:
          items["rows"].append((row, k, pos[k], labels[k], types[k]))
  out = {}
  for name, items in acc.items():
    out[name] = _target(name, items["n_classes"], items["rows"])
  if examples and examples[0].task == "reach":
    out["frontier"] = frontier(examples, lay, at)
    out["frontier_noncandidate"] = frontier(examples, lay, at, candidates=False)
  if examples and examples[0].task == "mult" and lay.mode == "cot" and at == "end":
    out.update(written_sum_targets(examples, lay))
  return out


def batch(examples, lay, seq_len):
  """The model-input rows of the examples (encode_rows at the final Coconut stage)."""
  return rt.encode_rows(examples, lay, seq_len, lay.max_stage)


def distances(edges, start):
  """BFS over (a, b) edges from start: {node: distance} and {node: parent on a shortest path}."""
  children, dist, parent, queue = {}, {start: 0}, {}, [start]
  for a, b in edges:
    children.setdefault(a, []).append(b)
  for v in queue:
    for c in children.get(v, []):
      if c not in dist:
        dist[c], parent[c] = dist[v] + 1, v
        queue.append(c)
  return dist, parent


def reachable(question):
  """(nodes reachable from the start, all nodes) of a reach question "a>b,...|start?c1/c2"."""
  edges = [tuple(e.split(">")) for e in question.split("|")[0].split(",")]
  start = question.split("|")[1].split("?")[0]
  return set(distances(edges, start)[0]), {x for e in edges for x in e}
