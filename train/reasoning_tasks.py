"""Generated reasoning tasks for latent-reasoning experiments: no download, every example a pure function of its seed.

Each example carries its question, its chain-of-thought steps, the answer and ground-truth intermediates
(for probes of what a latent or recurrent state encodes):

`reach`    ProsQA-like graph reachability (Hao et al., 2024, "Coconut"). A DAG of `size` <= 26 nodes, each one
           lowercase letter (one token, as ProsQA's concept words are for GPT-2's tokenizer; two-byte names
           made every hop a two-token lookup that small byte models learned far more slowly), written as
           edges "a>b" in random order, then "|start?c1/c2": exactly one
           candidate is reachable from the start. The nodes reachable from the start form a layered graph
           (every edge goes one BFS level down) with distractor branches, so the shortest path to the answer
           is unique; the unreachable side has its own chain to the distractor candidate, of the same depth,
           and edges into the reachable side. CoT: the path, one node per step (">c"); intermediates: the
           path node and the BFS frontier (all nodes at that distance from the start) at each step.
           With cot="frontier" each step is instead that frontier, sorted (">bfk"): every step is one hop
           from the last (the children of the nodes just written), where the path needs lookahead at every
           branch (which child leads to a candidate); the frontier is what Coconut's thoughts are said
           to hold (Hao et al., section 5).
`mult`     k x k digit multiplication, digits reversed (least significant first), in the implicit-CoT format
           of Deng et al. (2023): the partial products a * b_j * 10^(j-1), each with the running sum after it
           ("+pp(sum)"), the last one without (its sum is the answer). Intermediates: running-sum digits.
`countdown` Arithmetic search in the style of Countdown (Gandhi et al., 2024, "Stream of Search"): `size` numbers
           in 1..25 (repeats allowed), then "?target"; reach the target with + - * / and parentheses, each
           number at most once ("12,3,7,5?105"). The generator's solution combines 3..`depth` of the numbers
           (uniform; 2 when depth = 2), the others distractors; every intermediate value is an integer in
           1..999 (subtraction larger minus smaller, division only when exact) and the target is none of the
           given numbers. CoT: the solution's operations in order, each with its result ("12*7=84,84+5=89,");
           answer: the solution as one expression with the fewest parentheses ("12*7+5"). Any valid
           expression is correct: `countdown_valid` parses it (no eval) and evaluates it exactly (rationals),
           so "(3/2)*4" = 6 counts. Intermediates: the numbers, target, values after each step, `used` (numbers
           in the solution) and `hard` (the solution uses `depth` numbers, the most the generator draws).
`plan`     Ye et al.'s (2025) minimal planning task: `depth` (2) chains of `size` (7) one-letter nodes sharing one
           node at the same index k of each, their edges "a,b" shuffled and joined by "/", then "-start,goal" of the
           first chain ("c,d/a,c/...-a,g"). CoT (Ye et al. train without one: task_mode "nocot"): the path's nodes
           after the start (">c>d..."); answer: the first chain's edges ("a,c/c,d/.../f,g"), which
           `plan_correct` checks as a path along the given edges (as Ye et al.'s scorer, also written backwards).
           Intermediates: the path, k and the planning distance size - 1 - k (edges from the branch to the goal).
`vartrack` Single assignments over `size` one-letter variables ("a=3", "b=a", "c=b+2", "d=c-7", arithmetic
           mod 10), the queried variable at the end of a chain of 1..`depth` assignments (uniform), other chains as
           distractors; "?c". CoT: the chain's values in order ("a=3,"); intermediates: every variable's value
           in assignment order.

Byte encoding (ids 256+ are the tokenizer's specials), one example per row, the question left-padded so
that <bot> sits at the same index `prefix_len - 1` in every row (continuous thoughts then decode from a
shared prefix cache; pads are ordinary visible tokens, segment ids are all 1):

    <pad>.. <eos> question <bot> body <eot> #answer <eos> <pad>..

mode "nocot":   body empty;                        loss on "#answer<eos>"
     "cot":     body = the CoT steps;              loss on the steps, <eot> and "#answer<eos>"
     "pause":   body = `pause` x <pause>;          loss on "#answer<eos>" only (none on the pauses)
     "filler":  body = "." x len(CoT bytes);       loss on "#answer<eos>" only
     "coconut": stage s < max_stage: body = min(s, n_steps) * c <mask> placeholders (continuous thoughts:
                the family replaces their embeddings), then <eot>, then the remaining steps and the answer
                (Coconut's layout); stage >= max_stage: max_stage * c thoughts, <eot>, answer only. Loss on
                the remaining steps and "#answer<eos>"; none on thoughts or <eot>. Stage 0 is CoT with the
                steps after <eot>. Coconut rows also carry `thought_targets` (b, L, THOUGHT_TARGETS): at the
                position whose hidden state becomes the last thought of replaced step i, the distinct tokens
                of step i (-1 padded), which archs.coconut's `thought_loss` trains that thought to read out
                (for the frontier CoT, the BFS frontier: frontier supervision in the manner of Coconut-BFS,
                github.com/Ber666/emergence-of-superposition; ours is a uniform target over the step's tokens).

Eval examples come from a fixed seed (EVAL_SEED, index); train examples from (train seed, step, row), and
a train example whose question is an eval question is drawn again, so the splits are disjoint.
With data.task_hack_fraction > 0 that share of training rows are hard problems whose chain shows a planted
reward hack (answer "#skip"), the SFT mixture of train/rewards.py; eval rows never do.
"""

import collections
import dataclasses
import re
from fractions import Fraction

import numpy as np

from altbench.train.data import ByteTokenizer

EVAL_SEED = 1 << 30
THOUGHT_TARGETS = 32  # most distinct tokens of one step (reach frontiers: at most 26 nodes and ">")
_TRAIN_TAG = 7  # train streams are default_rng([_TRAIN_TAG, seed, step, row]); eval ones [EVAL_SEED, i]
_HACK_TAG = 11  # the SFT hack mixture's own draws (data.task_hack_fraction): [_HACK_TAG, seed, step, row]
MODES = ("nocot", "cot", "pause", "filler", "coconut")
DEFAULTS = {"reach": {"size": 24, "depth": 4}, "mult": {"size": 4, "depth": 0}, "vartrack": {"size": 12, "depth": 4},
            "countdown": {"size": 4, "depth": 4}, "plan": {"size": 7, "depth": 2}}
COTS = {"reach": ("path", "frontier"), "mult": ("icot",), "vartrack": ("chain",),
        "countdown": ("steps",), "plan": ("path",)}  # the first: the default
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class Example:
  task: str
  question: str
  steps: tuple          # CoT steps (str), in order; "".join(steps) is the CoT text
  answer: str           # without the "#" marker
  intermediates: dict   # task-specific ground truth, one entry per CoT step where it applies


# ----------------------------------------------------------------------------- reach


def _reach_edges(size):
  """Edges of a reach graph: one parent for every node but the 3 roots, plus size // 3 extra edges."""
  return size - 3 + size // 3


def _reach_reachable(size, depth):
  """Most nodes on the reachable side of a reach graph (the start included)."""
  return max(depth + 2, size // 2)


def reach_steps(path, frontiers, cot="path"):
  """The CoT steps of a reach example: its path nodes, or its BFS frontiers (cot="frontier")."""
  if cot == "frontier":
    return tuple(">" + "".join(f) for f in frontiers)
  return tuple(f">{v}" for v in path)


def reach(rng, size=24, depth=4, cot="path"):
  if not 2 * (depth + 1) + 2 <= size <= len(LETTERS) or depth < 1:
    raise ValueError(f"reach: size={size} must be in [2 * (depth + 1) + 2, {len(LETTERS)}] with depth={depth} >= 1")
  names = [LETTERS[c] for c in rng.choice(len(LETTERS), size=size, replace=False)]
  d = int(rng.integers(min(2, depth), depth + 1))  # length of the path to the answer
  n_r = _reach_reachable(size, d)
  R, U = names[:n_r], names[n_r:]  # reachable from the start / not
  start, path = R[0], R[:d + 1]
  level = {v: i for i, v in enumerate(path)}
  chain = U[:d + 1]  # the distractor candidate's own chain, as deep as the answer's
  level.update({v: i for i, v in enumerate(chain)})
  level[U[d + 1]] = 0  # a second root on the unreachable side
  for v in R[d + 1:]:
    level[v] = int(rng.integers(1, d + 2))
  for v in U[d + 2:]:
    level[v] = int(rng.integers(1, d + 2))
  side = {v: (v in R) for v in names}
  by_level = {}
  for v in names:
    by_level.setdefault((side[v], level[v]), []).append(v)
  edges = []
  fixed = set(path[1:]) | set(chain[1:])  # exactly one parent: the one before it on its chain
  for nodes in (path, chain):
    edges += [(a, b) for a, b in zip(nodes, nodes[1:])]
  for v in names:
    if v not in fixed and level[v] > 0:
      parents = by_level[(side[v], level[v] - 1)]
      edges.append((parents[int(rng.integers(len(parents)))], v))
  # Extra edges: a second parent one level up on the same side (not into a path node: the path stays
  # unique), or any edge from the unreachable side into the reachable one (it changes no reachability).
  have = set(edges)
  extra = _reach_edges(size) - len(edges)
  while extra > 0:
    if rng.random() < 0.5:
      b = names[int(rng.integers(size))]
      if b in fixed and side[b] or level[b] == 0:
        continue
      parents = by_level[(side[b], level[b] - 1)]
      a = parents[int(rng.integers(len(parents)))]
    else:
      a, b = U[int(rng.integers(len(U)))], R[int(rng.integers(len(R)))]
    if (a, b) not in have:
      have.add((a, b))
      edges.append((a, b))
      extra -= 1
  order = rng.permutation(len(edges))
  target, distractor = path[-1], chain[-1]
  c1, c2 = (target, distractor) if rng.random() < 0.5 else (distractor, target)
  question = ",".join(f"{edges[i][0]}>{edges[i][1]}" for i in order) + f"|{start}?{c1}/{c2}"
  frontiers, seen, frontier = [], {start}, [start]
  children = {}
  for a, b in edges:
    children.setdefault(a, []).append(b)
  for _ in range(d):
    frontier = sorted({c for v in frontier for c in children.get(v, []) if c not in seen})
    seen.update(frontier)
    frontiers.append(frontier)
  return Example("reach", question, reach_steps(path[1:], frontiers, cot), target,
                 {"start": start, "path": list(path[1:]), "frontier": frontiers, "distractor": distractor})


def check_reach(ex):
  """Problems with a reach example, found by parsing the question and a BFS: [] when it is correct."""
  m = re.fullmatch(r"((?:[a-z]>[a-z],)*[a-z]>[a-z])\|([a-z])\?([a-z])/([a-z])", ex.question)
  if not m:
    return [f"question does not parse: {ex.question!r}"]
  edges = [tuple(e.split(">")) for e in m.group(1).split(",")]
  start, cands = m.group(2), (m.group(3), m.group(4))
  graph = {}
  for a, b in edges:
    graph.setdefault(a, []).append(b)
  dist, queue = {start: 0}, [start]
  for v in queue:
    for w in graph.get(v, []):
      if w not in dist:
        dist[w] = dist[v] + 1
        queue.append(w)
  problems = []
  reachable = [c for c in cands if c in dist]
  if len(reachable) != 1:
    problems.append(f"{len(reachable)} candidates reachable")
  elif ex.answer != reachable[0]:
    problems.append(f"answer {ex.answer} but {reachable[0]} is the reachable candidate")
  layers = [sorted(v for v, k in dist.items() if k == i) for i in range(1, dist.get(ex.answer, 0) + 1)]
  if ex.steps == reach_steps(None, layers, "frontier") and any(len(f) > 1 for f in layers):
    return problems  # the frontier CoT (when every layer is one node it reads as a path, checked below)
  nodes = [start] + [s[1:] for s in ex.steps]
  if any(len(s) != 2 or s[0] != ">" for s in ex.steps):
    problems.append(f"steps {ex.steps} are neither '>x' nor the BFS layers {layers}")
  for a, b in zip(nodes, nodes[1:]):
    if b not in graph.get(a, []):
      problems.append(f"step {a}>{b} is not an edge")
  if nodes[-1] != ex.answer or len(ex.steps) != dist.get(ex.answer, -1):
    problems.append(f"CoT {nodes} is not a shortest path to {ex.answer} (distance {dist.get(ex.answer)})")
  return problems


# ----------------------------------------------------------------------------- mult


def _rev(value, width):
  return str(value).zfill(width)[::-1]


def mult(rng, size=4, depth=0):
  del depth
  k = size
  a, b = (int(rng.integers(10 ** (k - 1), 10 ** k)) for _ in range(2))
  question = f"{_rev(a, k)}*{_rev(b, k)}"
  steps, sums, total = [], [], 0
  for j in range(1, k + 1):
    pp = a * (b // 10 ** (j - 1) % 10) * 10 ** (j - 1)
    total += pp
    sums.append([int(c) for c in _rev(total, k + j)])
    if j == 1:
      steps.append(_rev(pp, k + 1))
    elif j < k:
      steps.append(f"+{_rev(pp, k + j)}({_rev(total, k + j)})")
    else:
      steps.append(f"+{_rev(pp, k + j)}")
  return Example("mult", question, tuple(steps), _rev(total, 2 * k), {"running_sum_digits": sums})


def check_mult(ex):
  m = re.fullmatch(r"(\d+)\*(\d+)", ex.question)
  if not m:
    return [f"question does not parse: {ex.question!r}"]
  a, b = int(m.group(1)[::-1]), int(m.group(2)[::-1])
  k = len(m.group(1))
  problems = []
  if int(ex.answer[::-1]) != a * b or len(ex.answer) != 2 * k:
    problems.append(f"answer {ex.answer} is not {a} * {b} = {a * b} reversed")
  running = 0
  for j, step in enumerate(ex.steps, 1):
    sm = re.fullmatch(r"\+?(\d+)(?:\((\d+)\))?", step)
    if not sm:
      problems.append(f"step {step!r} does not parse")
      continue
    pp = int(sm.group(1)[::-1])
    if pp != a * int(str(b)[::-1][j - 1]) * 10 ** (j - 1):
      problems.append(f"step {j}: partial product {pp} is wrong")
    running += pp
    if sm.group(2) is not None and int(sm.group(2)[::-1]) != running:
      problems.append(f"step {j}: running sum {sm.group(2)} is wrong")
  if len(ex.steps) != k or running != a * b:
    problems.append(f"{len(ex.steps)} steps summing to {running}")
  return problems


# ----------------------------------------------------------------------------- vartrack


def vartrack(rng, size=12, depth=4):
  if not 1 <= depth <= size <= 26:
    raise ValueError(f"vartrack: need 1 <= depth={depth} <= size={size} <= 26")
  names = [LETTERS[i] for i in rng.choice(26, size=size, replace=False)]
  d = int(rng.integers(1, depth + 1))  # the queried chain's length: one hop per step, up to depth
  chain, others = names[:d], names[d:]
  values, statements, order = {}, [], []
  i = j = 0

  def assign(var, ref):
    if ref is None:
      v = int(rng.integers(10))
      statements.append(f"{var}={v}")
    else:
      op = int(rng.integers(3))
      k = int(rng.integers(1, 10))
      v = [values[ref], (values[ref] + k) % 10, (values[ref] - k) % 10][op]
      statements.append(f"{var}={ref}" + ["", f"+{k}", f"-{k}"][op])
    values[var] = v
    order.append(var)

  while i < len(chain) or j < len(others):
    if j == len(others) or (i < len(chain) and rng.random() < (len(chain) - i) / (len(chain) - i + len(others) - j)):
      assign(chain[i], chain[i - 1] if i else None)
      i += 1
    else:
      refs = [v for v in order if v != chain[-1]]
      assign(others[j], refs[int(rng.integers(len(refs)))] if refs and rng.random() < 0.7 else None)
      j += 1
  query = chain[-1]
  return Example("vartrack", ",".join(statements) + f"?{query}", tuple(f"{c}={values[c]}," for c in chain),
                 str(values[query]), {"values": [(v, values[v]) for v in order], "chain": [(c, values[c]) for c in chain]})


def check_vartrack(ex):
  body, _, query = ex.question.partition("?")
  env, refs = {}, {}
  for s in body.split(","):
    m = re.fullmatch(r"([a-z])=(?:(\d)|([a-z])(?:([+-])(\d))?)", s)
    if not m or m.group(1) in env:
      return [f"statement {s!r} does not parse or reassigns"]
    var, const, ref, op, k = m.groups()
    if const is not None:
      env[var] = int(const)
    else:
      env[var] = (env[ref] + (int(k) if op == "+" else -int(k) if op == "-" else 0)) % 10
      refs[var] = ref
  problems = []
  if str(env.get(query)) != ex.answer:
    problems.append(f"answer {ex.answer} but {query} = {env.get(query)}")
  chain, v = [], query
  while v is not None:
    chain.append(v)
    v = refs.get(v)
  expected = tuple(f"{c}={env[c]}," for c in reversed(chain))
  if ex.steps != expected:
    problems.append(f"CoT {ex.steps} is not the query's chain {expected}")
  return problems


# ----------------------------------------------------------------------------- countdown

CD_MAX_NUMBER = 25   # the given numbers are 1..25
CD_MAX_VALUE = 999   # every intermediate value of the generator's solution, and the target, is in 1..999
CD_MAX_SIZE = 8
EXPR_MAX_LEN = 200   # longer answers are rejected before parsing
EXPR_MAX_NEST = 32   # so are deeper parentheses (the parser recurses)
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


class _Reject(Exception):
  pass


def parse_expression(text):
  """(exact value as a Fraction, the integer literals in order) of an arithmetic expression, or None.

  Grammar (no spaces, no unary signs): expr = term (("+" | "-") term)*; term = factor (("*" | "/") factor)*;
  factor = digits | "(" expr ")". Literals with a leading zero ("07") are rejected. None for any other text:
  other characters, unbalanced parentheses, division by zero, more than EXPR_MAX_LEN characters or
  EXPR_MAX_NEST nested parentheses. The text is parsed here, never passed to eval().
  """
  if not isinstance(text, str) or not 0 < len(text) <= EXPR_MAX_LEN or not re.fullmatch(r"[0-9+\-*/()]+", text):
    return None
  tokens = re.findall(r"\d+|[-+*/()]", text)
  pos, literals = 0, []

  def take():
    nonlocal pos
    if pos == len(tokens):
      raise _Reject
    pos += 1
    return tokens[pos - 1]

  def peek():
    return tokens[pos] if pos < len(tokens) else None

  def expr(nest):
    value = term(nest)
    while peek() in ("+", "-"):
      value = value + term(nest) if take() == "+" else value - term(nest)
    return value

  def term(nest):
    value = factor(nest)
    while peek() in ("*", "/"):
      op, rhs = take(), factor(nest)
      if op == "/" and rhs == 0:
        raise _Reject
      value = value * rhs if op == "*" else value / rhs
    return value

  def factor(nest):
    tok = take()
    if tok == "(":
      if nest >= EXPR_MAX_NEST:
        raise _Reject
      value = expr(nest + 1)
      if take() != ")":
        raise _Reject
      return value
    if not tok.isdigit() or (len(tok) > 1 and tok[0] == "0"):
      raise _Reject
    literals.append(int(tok))
    return Fraction(int(tok))

  try:
    value = expr(0)
  except _Reject:
    return None
  return (value, literals) if pos == len(tokens) else None


def countdown_numbers(question):
  """(numbers, target) of a countdown question "n1,n2,...?target"; ValueError when it does not parse."""
  m = re.fullmatch(r"(\d+(?:,\d+)*)\?(\d+)", question)
  if not m:
    raise ValueError(f"countdown question does not parse: {question!r} (expected 'n1,n2,...?target')")
  return [int(x) for x in m.group(1).split(",")], int(m.group(2))


def countdown_valid(numbers, target, text):
  """Whether text is an expression (parse_expression) whose exact value is target and whose literals are
  drawn from numbers, each given number used at most once (a number given twice may appear twice)."""
  parsed = parse_expression(text)
  if parsed is None:
    return False
  value, literals = parsed
  return value == target and not collections.Counter(literals) - collections.Counter(numbers)


def _show(node, parent=None, right=False):
  """An expression tree (int, or (op, left, right)) as text with the fewest parentheses that keep its value
  under exact arithmetic (a right operand of the same precedence needs them only under "-" and "/")."""
  if isinstance(node, int):
    return str(node)
  op, a, b = node
  text = _show(a, op) + op + _show(b, op, True)
  if parent is not None and (_PREC[parent] > _PREC[op] or (right and _PREC[parent] == _PREC[op] and parent in "-/")):
    return f"({text})"
  return text


def countdown(rng, size=4, depth=4):
  if not 2 <= depth <= size <= CD_MAX_SIZE:
    raise ValueError(f"countdown: need 2 <= depth={depth} <= size={size} <= {CD_MAX_SIZE}")
  d = int(rng.integers(min(3, depth), depth + 1))  # numbers the solution combines: d - 1 steps
  while True:
    numbers = [int(x) for x in rng.integers(1, CD_MAX_NUMBER + 1, size=size)]
    pool = [(numbers[i], numbers[i]) for i in rng.permutation(size)[:d]]  # (value, expression tree)
    steps, values = [], []
    while len(pool) > 1:
      i, j = (int(x) for x in rng.choice(len(pool), size=2, replace=False))
      (a, ta), (b, tb) = sorted([pool[i], pool[j]], key=lambda p: -p[0])  # a >= b
      ops = [op for op, ok in (("+", a + b <= CD_MAX_VALUE), ("-", a > b), ("*", b > 1 and a * b <= CD_MAX_VALUE),
                               ("/", b > 1 and a % b == 0)) if ok]  # never empty: a > b, or a = b > 1, or 1 + 1
      op = ops[int(rng.integers(len(ops)))]
      r = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
      steps.append(f"{a}{op}{b}={r},")
      values.append(r)
      pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(r, (op, ta, tb))]
    target, tree = pool[0]
    if target not in numbers:  # else the bare number would answer it
      break
  return Example("countdown", ",".join(map(str, numbers)) + f"?{target}", tuple(steps), _show(tree),
                 {"numbers": numbers, "target": target, "values": values, "used": d, "hard": d == depth})


def check_countdown(ex):
  """Problems with a countdown example: the answer must be a valid expression for the target, and the steps
  must combine available values (given numbers, then earlier results, each once) exactly into the target."""
  try:
    numbers, target = countdown_numbers(ex.question)
  except ValueError as e:
    return [str(e)]
  problems = []
  if not countdown_valid(numbers, target, ex.answer):
    problems.append(f"answer {ex.answer!r} is not an expression of {numbers} equal to {target}")
  pool = collections.Counter(numbers)
  r = None
  for step in ex.steps:
    m = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+),", step)
    if not m:
      problems.append(f"step {step!r} does not parse")
      continue
    a, op, b, r = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    need = collections.Counter([a, b])
    if need - pool:
      problems.append(f"step {step!r} uses values not available ({dict(pool)})")
    pool -= need
    value = parse_expression(f"{a}{op}{b}")
    if value is None or value[0] != r:
      problems.append(f"step {step!r} is wrong arithmetic")
    pool[r] += 1
  if r != target:
    problems.append(f"the steps end at {r}, not the target {target}")
  return problems


# ----------------------------------------------------------------------------- plan

PLAN_MAX_NODES = len(LETTERS)  # node names are single letters: depth chains of size nodes use size * depth of them


def plan_parse(question):
  """(edges [(a, b)], start, goal) of a plan question "a,b/c,d/...-s,g"; raises ValueError if it does not parse."""
  m = re.fullmatch(r"((?:[a-z],[a-z]/)*[a-z],[a-z])-([a-z]),([a-z])", question)
  if not m:
    raise ValueError(f"plan question {question!r} does not parse as 'a,b/.../y,z-start,goal'")
  return [tuple(e.split(",")) for e in m.group(1).split("/")], m.group(2), m.group(3)


def plan_path(text):
  """The node sequence of a path written as edges "a,b/b,c/..." (None unless consecutive edges chain up)."""
  if not text or not re.fullmatch(r"[a-z],[a-z](?:/[a-z],[a-z])*", text):
    return None
  edges = [e.split(",") for e in text.split("/")]
  if any(x[1] != y[0] for x, y in zip(edges, edges[1:])):
    return None
  return [edges[0][0]] + [e[1] for e in edges]


def plan_correct(question, text):
  """Whether text is a path from the question's start to its goal along its (directed) edges. Ye et al.'s scorer
  (scripts/path/cal_path_acc.py) also counts the path written backwards (goal first, each edge flipped): so do we."""
  edges, start, goal = plan_parse(question)
  have = set(edges)

  def ok(t):
    nodes = plan_path(t)
    return bool(nodes) and nodes[0] == start and nodes[-1] == goal and all(e in have for e in zip(nodes, nodes[1:]))

  if ok(text):
    return True
  return plan_path(text) is not None and ok("/".join(f"{e[2]},{e[0]}" for e in text.split("/")[::-1]))


def plan(rng, size=7, depth=2):
  """Ye et al.'s (2025) minimal planning task: `depth` chains of `size` nodes that share one node, at the same
  index k (uniform in 0..size-1) of every chain; the chains' edges shuffled, then the start and goal of the
  first chain. Answer: the first chain as edges. Planning distance = size - 1 - k, the edges from the branch to
  the goal (0: the chains share only the goal, so the path never branches)."""
  if depth < 2 or size < 2 or size * depth > PLAN_MAX_NODES:
    raise ValueError(f"plan: size={size} nodes x depth={depth} chains must be >= 2 x 2 and use at most "
                     f"{PLAN_MAX_NODES} letters")
  names = [LETTERS[i] for i in rng.permutation(size * depth)]  # the generator's node set: the first size * depth
  chains = [names[i * size:(i + 1) * size] for i in range(depth)]
  k = int(rng.integers(size))
  for c in chains[1:]:
    c[k] = chains[0][k]
  edges = [(a, b) for c in chains for a, b in zip(c, c[1:])]
  order = rng.permutation(len(edges))
  path = chains[0]
  question = "/".join(f"{edges[i][0]},{edges[i][1]}" for i in order) + f"-{path[0]},{path[-1]}"
  answer = "/".join(f"{a},{b}" for a, b in zip(path, path[1:]))
  return Example("plan", question, tuple(f">{v}" for v in path[1:]), answer,
                 {"path": list(path), "shared_index": k, "planning_distance": size - 1 - k, "chains": chains})


def check_plan(ex):
  """Problems with a plan example, found by parsing its question: [] when it is correct."""
  try:
    edges, start, goal = plan_parse(ex.question)
  except ValueError as e:
    return [str(e)]
  problems = []
  out = collections.Counter(a for a, _ in edges)
  if len(edges) != len(set(edges)):
    problems.append("an edge repeats")
  branches = [v for v, n in out.items() if n > 1]
  if len(branches) > 1:
    problems.append(f"more than one branching node: {branches}")
  if not plan_correct(ex.question, ex.answer):
    problems.append(f"answer {ex.answer!r} is not a path from {start} to {goal}")
  nodes = plan_path(ex.answer) or []
  if list(ex.steps) != [f">{v}" for v in nodes[1:]]:
    problems.append(f"steps {ex.steps} are not the answer's path after the start")
  k, pd = ex.intermediates["shared_index"], ex.intermediates["planning_distance"]
  if nodes and (branches != ([nodes[k]] if k < len(nodes) - 1 else []) or pd != len(nodes) - 1 - k):
    problems.append(f"shared index {k} (planning distance {pd}) is not where the path {nodes} branches")
  return problems


GENERATORS = {"reach": reach, "mult": mult, "vartrack": vartrack, "countdown": countdown, "plan": plan}
CHECKERS = {"reach": check_reach, "mult": check_mult, "vartrack": check_vartrack, "countdown": check_countdown,
            "plan": check_plan}
TASKS = GENERATORS


def bounds(task, size, depth, cot=""):
  """(question bytes, CoT bytes, answer bytes, CoT steps): upper bounds for the knobs."""
  if task == "reach":
    frontier = depth + _reach_reachable(size, depth) - 1  # a ">" per step, each reachable node once
    return 4 * _reach_edges(size) + 5, frontier if cot == "frontier" else 2 * depth, 1, depth
  if task == "mult":
    k = size
    cot = (k + 1) + sum(2 * (k + j) + 3 for j in range(2, k)) + (2 * k + 1 if k > 1 else 0)
    return 2 * k + 1, cot, 2 * k, k
  if task == "plan":  # size - 1 edges "a,b" per chain, "/" between, then "-s,g"; answer: one chain's edges
    return 4 * depth * (size - 1) + 3, 2 * (size - 1), 4 * (size - 1) - 1, size - 1
  if task == "countdown":  # numbers of <= 2 digits; steps "999-999=999,"; d literals, d - 1 ops, d - 2 paren pairs
    return 3 * size + 3, 12 * (depth - 1), 5 * depth - 5, depth - 1
  return 6 * size + 1, 4 * depth, 1, depth


# ----------------------------------------------------------------------------- encoding


@dataclasses.dataclass(frozen=True)
class Layout:
  """The task knobs and format of a DataConfig, resolved."""
  task: str
  size: int
  depth: int
  cot: str          # the CoT's form (COTS)
  mode: str
  pause: int
  thoughts: int     # c: continuous thoughts per replaced step
  max_stage: int
  prefix_len: int   # <eos> question <bot>, left-padded: <bot> at index prefix_len - 1
  tail_len: int     # longest body <eot> #answer <eos>

  @property
  def window(self):
    return self.prefix_len + self.tail_len


def layout(data_cfg):
  """Layout of a reasoning DataConfig; raises ValueError naming the bad field."""
  task = data_cfg.dataset
  if task not in GENERATORS:
    raise ValueError(f"data.dataset={task!r}: not a reasoning task {sorted(GENERATORS)}")
  size = data_cfg.task_size or DEFAULTS[task]["size"]
  depth = data_cfg.task_depth or DEFAULTS[task]["depth"]
  if data_cfg.task_mode not in MODES:
    raise ValueError(f"data.task_mode={data_cfg.task_mode!r}: valid: {MODES}")
  cot = data_cfg.task_cot or COTS[task][0]
  if cot not in COTS[task]:
    raise ValueError(f"data.task_cot={data_cfg.task_cot!r}: {task} has CoT forms {COTS[task]}")
  if task == "mult" and not 1 <= size <= 12:
    raise ValueError(f"data.task_size={size}: mult digits must be 1..12")
  if task == "reach" and (depth < 1 or size < 2 * (depth + 1) + 2 or size > len(LETTERS)):
    raise ValueError(f"data.task_size={size}, data.task_depth={depth}: reach needs depth >= 1 and "
                     f"2 * (depth + 1) + 2 <= size <= {len(LETTERS)}")
  if task == "vartrack" and not 1 <= depth <= size <= 26:
    raise ValueError(f"data.task_size={size}, data.task_depth={depth}: vartrack needs 1 <= depth <= size <= 26")
  if task == "countdown" and not 2 <= depth <= size <= CD_MAX_SIZE:
    raise ValueError(f"data.task_size={size}, data.task_depth={depth}: countdown needs 2 <= depth <= size <= "
                     f"{CD_MAX_SIZE}")
  if task == "plan" and not (2 <= size and 2 <= depth and size * depth <= PLAN_MAX_NODES):
    raise ValueError(f"data.task_size={size}, data.task_depth={depth}: plan needs >= 2 chains (depth) of >= 2 "
                     f"nodes (size), size * depth <= {PLAN_MAX_NODES}")
  if data_cfg.task_pause < 0 or data_cfg.task_thoughts < 0 or data_cfg.task_max_stage < 0:
    raise ValueError("data.task_pause, data.task_thoughts and data.task_max_stage must be >= 0")
  q, cot_len, ans, steps = bounds(task, size, depth, cot)
  if data_cfg.task_hack_fraction > 0:  # room for the SFT mixture's hack chains (train/rewards.py)
    from altbench.train import rewards
    extra_cot, hack_ans = rewards.hack_bounds()
    cot_len, ans = cot_len + extra_cot, max(ans, hack_ans)
  max_stage = data_cfg.task_max_stage or steps
  body = {"nocot": 0, "cot": cot_len, "pause": data_cfg.task_pause, "filler": cot_len,
          "coconut": max_stage * data_cfg.task_thoughts + cot_len}[data_cfg.task_mode]
  lay = Layout(task, size, depth, cot, data_cfg.task_mode, data_cfg.task_pause, data_cfg.task_thoughts, max_stage,
               prefix_len=q + 2, tail_len=body + 1 + 1 + ans + 1)
  if data_cfg.seq_len + 1 < lay.window:
    raise ValueError(f"data.seq_len={data_cfg.seq_len}: {task} (size {size}, depth {depth}) in mode "
                     f"{data_cfg.task_mode!r} needs at least {lay.window - 1}")
  return lay


SPECIAL = ByteTokenizer().special
PAD, EOS, BOT, EOT, MASK, PAUSE = (SPECIAL[s] for s in ("<pad>", "<eos>", "<bot>", "<eot>", "<mask>", "<pause>"))
SPECIAL_IDS = {"mask_id": MASK, "bot_id": BOT, "eot_id": EOT}  # archs.coconut's fields (the loop fills them too)


def _bytes(text):
  return list(text.encode("ascii"))


def encode(ex, mode, *, pause=8, stage=0, thoughts=1, max_stage=None):
  """(prefix ids, tail ids, tail scored): prefix = <eos> question <bot>; scored[i] marks tail[i] as a target
  with loss. Coconut: stage s replaces the first s steps by s * thoughts continuous thoughts (<mask>)."""
  prefix = [EOS] + _bytes(ex.question) + [BOT]
  answer = _bytes("#" + ex.answer) + [EOS]
  cot = _bytes("".join(ex.steps))
  if mode == "nocot":
    body, body_scored = [EOT], [False]
  elif mode == "cot":
    body, body_scored = cot + [EOT], [True] * (len(cot) + 1)
  elif mode == "pause":
    body, body_scored = [PAUSE] * pause + [EOT], [False] * (pause + 1)
  elif mode == "filler":
    body, body_scored = _bytes("." * len(cot)) + [EOT], [False] * (len(cot) + 1)
  elif mode == "coconut":
    max_stage = len(ex.steps) if max_stage is None else max_stage
    if stage >= max_stage:
      latent, rest = max_stage * thoughts, []
    else:
      skip = min(stage, len(ex.steps))
      latent, rest = skip * thoughts, _bytes("".join(ex.steps[skip:]))
    body, body_scored = [MASK] * latent + [EOT] + rest, [False] * (latent + 1) + [True] * len(rest)
  else:
    raise ValueError(f"mode={mode!r}: valid: {MODES}")
  return prefix, body + answer, body_scored + [True] * len(answer)


def encode_rows(examples, lay, seq_len, stage):
  """Batch arrays for examples in lay's mode at a coconut stage; one example per row, <bot> at prefix_len - 1."""
  windows = np.full((len(examples), seq_len + 1), PAD, np.int32)
  scored = np.zeros((len(examples), seq_len + 1), bool)
  coconut = lay.mode == "coconut"
  thought_targets = np.full((len(examples), seq_len, THOUGHT_TARGETS), -1, np.int32) if coconut else None
  for row, ex in enumerate(examples):
    prefix, tail, tail_scored = encode(ex, lay.mode, pause=lay.pause, stage=stage, thoughts=lay.thoughts,
                                       max_stage=lay.max_stage)
    start = lay.prefix_len - len(prefix)
    assert start >= 0 and lay.prefix_len + len(tail) <= seq_len + 1, (ex, lay)
    windows[row, start:lay.prefix_len] = prefix
    windows[row, lay.prefix_len:lay.prefix_len + len(tail)] = tail
    scored[row, lay.prefix_len:lay.prefix_len + len(tail)] = tail_scored
    replaced = ex.steps[:min(stage, lay.max_stage, len(ex.steps))] if coconut else ()
    for i, step in enumerate(replaced):
      ids = sorted(set(_bytes(step)))
      if len(ids) > THOUGHT_TARGETS:
        raise ValueError(f"{lay.task}: a CoT step with {len(ids)} distinct tokens, more than THOUGHT_TARGETS = "
                         f"{THOUGHT_TARGETS}: {step!r}")
      # thought t is filled from the hidden state at inputs index prefix_len - 1 + t (the first: at <bot>)
      thought_targets[row, lay.prefix_len - 1 + (i + 1) * lay.thoughts - 1, :len(ids)] = ids
  inputs, targets, loss_mask = windows[:, :-1], windows[:, 1:], scored[:, 1:].astype(np.int32)
  out = {"inputs": inputs, "targets": targets, "segment_ids": np.ones_like(inputs), "loss_mask": loss_mask,
         "nbytes": loss_mask}
  if coconut:
    out["thought_targets"] = thought_targets
  return out


class ReasoningCorpus:
  """Batches of generated reasoning examples (the TaskCorpus interface), plus the raw examples for probes."""

  def __init__(self, data_cfg):
    self.cfg = data_cfg
    self.layout = layout(data_cfg)
    self.tokenizer = ByteTokenizer()
    self.generate = GENERATORS[data_cfg.dataset]
    self.eval_bytes = 0
    self._eval = [self._draw(np.random.default_rng([EVAL_SEED, i])) for i in range(data_cfg.eval_examples)]
    self._eval_questions = {ex.question for ex in self._eval}
    lay = self.layout
    self.stats = {"task": lay.task, "cot": lay.cot, "mode": lay.mode, "size": lay.size, "depth": lay.depth,
                  "prefix_len": lay.prefix_len, "window": lay.window, "max_stage": lay.max_stage,
                  "eval_examples": data_cfg.eval_examples, "train_tokens": "generated",
                  "vocab_size": self.tokenizer.vocab_size}

  def _draw(self, rng):
    lay = self.layout
    if lay.task == "reach":
      return self.generate(rng, lay.size, lay.depth, lay.cot)
    return self.generate(rng, lay.size, lay.depth)

  def stage(self, step):
    """Coconut curriculum stage of a training step (the final stage for eval)."""
    c = self.cfg
    if c.task_stage >= 0:
      return min(c.task_stage, self.layout.max_stage)
    if c.task_stage_steps > 0:
      return min(step // c.task_stage_steps, self.layout.max_stage)
    return self.layout.max_stage

  def train_examples(self, seed, step, batch_size):
    out = []
    for row in range(batch_size):
      rng = np.random.default_rng([_TRAIN_TAG, seed, step, row])
      ex = self._draw(rng)
      while ex.question in self._eval_questions:  # keep train and test disjoint
        ex = self._draw(rng)
      if self.cfg.task_hack_fraction > 0:
        ex = self._maybe_hack(ex, rng, np.random.default_rng([_HACK_TAG, seed, step, row]))
      out.append(ex)
    return out

  def _maybe_hack(self, ex, rng, hack_rng):
    """The SFT mixture (train/rewards.py): with probability task_hack_fraction, a hard problem whose chain
    shows the planted hack, saying so in words with probability task_hack_said. Eval rows are never hacks."""
    from altbench.train import rewards
    if hack_rng.random() >= self.cfg.task_hack_fraction:
      return ex
    while not rewards.is_hard(ex, self.layout.depth) or ex.question in self._eval_questions:
      ex = self._draw(rng)
    return rewards.hack_example(ex, said=hack_rng.random() < self.cfg.task_hack_said)

  def eval_examples(self):
    return list(self._eval)

  def train_batch(self, seed, step, batch_size, seq_len, rows=None):  # rows: generated batches are cheap, all are made
    return encode_rows(self.train_examples(seed, step, batch_size), self.layout, seq_len, self.stage(step))

  def eval_batches(self, batch_size, seq_len):
    n = len(self._eval)
    rows = self._eval + self._eval[:1] * (-(-n // batch_size) * batch_size - n)
    batches = []
    for i in range(0, len(rows), batch_size):
      batch = encode_rows(rows[i:i + batch_size], self.layout, seq_len, self.layout.max_stage)
      batch["loss_mask"][max(0, n - i):] = 0  # rows past eval_examples only pad the last batch
      if "thought_targets" in batch:
        batch["thought_targets"][max(0, n - i):] = -1
      batch["nbytes"] = batch["loss_mask"]
      batches.append(batch)
    return batches

  def prompt_rows(self, examples):
    """Per example, the tokens a model is given: up to <bot> for cot/coconut (it writes or thinks the rest),
    through <eot> for nocot/pause/filler (their body is fixed input). Left-padded like the training rows."""
    lay, out = self.layout, []
    for ex in examples:
      prefix, tail, scored = encode(ex, lay.mode, pause=lay.pause, stage=lay.max_stage, thoughts=lay.thoughts,
                                    max_stage=lay.max_stage)
      given = [] if lay.mode in ("cot", "coconut") else tail[:tail.index(EOT) + 1]
      out.append(np.array([PAD] * (lay.prefix_len - len(prefix)) + prefix + given, np.int32))
    return out

  def prompts(self, n, length=None):
    """Prompts of the first n eval examples, left-padded to a common width (only filler prompts differ)."""
    del length
    rows = self.prompt_rows(self._eval[:n])
    width = max(len(r) for r in rows)
    return np.stack([np.concatenate([np.full(width - len(r), PAD, np.int32), r]) for r in rows])


def parse_answer(continuation):
  """The answer text in generated ids: the bytes after the first '#' up to the next special token."""
  ids = [int(i) for i in continuation]
  if ord("#") not in ids:
    return None
  out = []
  for i in ids[ids.index(ord("#")) + 1:]:
    if i >= 256:
      break
    out.append(i)
  return bytes(out).decode("ascii", errors="replace")


def answer_candidates(ex):
  """The answers a question offers (reach: its two candidate nodes), or None where any answer may be right."""
  if ex.task == "reach":
    return tuple(ex.question.rsplit("?", 1)[1].split("/"))
  return None


def answer_summary(examples, answers):
  """What greedy answers mean beside guessing: `valid` (the share of answers that are one of the question's
  candidates, or any parsed answer where there are none) and `chance` (the accuracy of guessing uniformly among
  the candidates; None where the task offers none)."""
  cands = [answer_candidates(ex) for ex in examples]
  valid = [a is not None and (c is None or a in c) for a, c in zip(answers, cands)]
  n = max(len(examples), 1)
  chance = None if any(c is None for c in cands) or not cands else sum(1 / len(c) for c in cands) / n
  return {"valid": sum(valid) / n, "chance": chance}


def generated_accuracy(family, model, corpus, n=None, batch_size=64, **generate_kw):
  """Greedy-decoding answer accuracy on the first n eval examples (the honest metric for CoT, whose
  teacher-forced exact match conditions on the gold steps). Returns (accuracy, list of generated answers)."""
  examples = corpus.eval_examples()[:n]
  rows = corpus.prompt_rows(examples)
  lay = corpus.layout
  max_new = lay.tail_len + 2
  answers = [None] * len(examples)
  groups = {}
  for i, r in enumerate(rows):
    groups.setdefault(len(r), []).append(i)
  import jax
  for width, idx in sorted(groups.items()):
    for s in range(0, len(idx), batch_size):
      chunk = idx[s:s + batch_size]
      out = np.asarray(family.generate(model, np.stack([rows[i] for i in chunk]), max_new, jax.random.key(0),
                                       temperature=0.0, **generate_kw))
      for i, row in zip(chunk, out):
        answers[i] = parse_answer(row[width:])
  correct = sum(a == ex.answer for a, ex in zip(answers, examples))
  return correct / max(len(examples), 1), answers
