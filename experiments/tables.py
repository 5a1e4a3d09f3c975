"""README tables generated from committed raw files, so that a typed number cannot drift from its source.

A generated table sits in a README between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; TABLES maps NAME to
the function that writes it from files under experiments/results/.

  python experiments/tables.py           rewrite every generated table in README.md and experiments/results/README.md
  python experiments/tables.py --check   exit 1 naming each table that differs from its raw file (tests/test_tables.py)
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
READMES = (os.path.join(ROOT, "README.md"), os.path.join(RESULTS, "README.md"))


def _read_json(name):
  with open(os.path.join(RESULTS, name)) as f:
    return json.load(f)


def _read_jsonl(name):
  with open(os.path.join(RESULTS, name)) as f:
    return [json.loads(line) for line in f if line.strip()]


def arena_text_group(name):
  """The text group of a committed arena leaderboard, best first."""
  board = _read_json(os.path.join(name, "leaderboard.json"))
  group = next(g for g in board["groups"] if g["metric"] == "bpb" and g["budget_flops"])
  lines = ["| entry | pattern | held-out bpb | parameters | decode tok/s (ctx 128 / 2048) | wall s |",
           "|---|---|---|---|---|---|"]
  for r in group["rows"]:
    if r["status"] != "done":
      lines.append(f"| {r['name']} | | {r['status']} | | | |")
      continue
    bpb = ("<= " if r.get("bound") else "") + f"{r['eval_bpb']:.3f}"
    if r.get("eval_bpb_se"):
      bpb += f" +- {r['eval_bpb_se']:.3f}"
    curve = r.get("decode_curve") or {}
    decode = f"{curve['128']:.0f} / {curve['2048']:.0f}" if "128" in curve and "2048" in curve else ""
    pattern = f"`{r['pattern']}`" if r.get("pattern") else ""
    lines.append(f"| {r['name']} | {pattern} | {bpb} | {r['params'] / 1e6:.2f}M | {decode} | {r['wall_s']:.0f} |")
  return "\n".join(lines)


def decode_ratios(name):
  """Per-token decode time at the largest context over the smallest, per model, from a decode.py JSONL."""
  rows = [r for r in _read_jsonl(name) if not r.get("summary")]
  lines = ["| model | pattern | " + " | ".join(f"ms/token at {c}" for c in sorted({r["context"] for r in rows}))
           + " | largest / smallest |"]
  contexts = sorted({r["context"] for r in rows})
  lines.append("|---|---|" + "---|" * len(contexts) + "---|")
  for model in dict.fromkeys(r["model"] for r in rows):
    ms = {r["context"]: r["ms_per_token"] for r in rows if r["model"] == model}
    pattern = next(r["pattern"] for r in rows if r["model"] == model)
    cells = " | ".join(f"{ms[c]:.3f}" if c in ms else "" for c in contexts)
    lines.append(f"| {model} | `{pattern}` | {cells} | {ms[max(ms)] / ms[min(ms)]:.2f} |")
  return "\n".join(lines)


TABLES = {
    "arena-cpu": lambda: arena_text_group("arena_cpu"),
    "decode-cpu": lambda: decode_ratios("decode_cpu.jsonl"),
}
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(\n<!-- /table:(?P=name) -->)", re.S)


def render(text):
  """text with every generated block rewritten; raises KeyError naming an unknown table."""
  def sub(m):
    if m.group("name") not in TABLES:
      raise KeyError(f"<!-- table:{m.group('name')} -->: no such table; known: {sorted(TABLES)}")
    return m.group(1) + TABLES[m.group("name")]() + m.group(4)
  return BLOCK.sub(sub, text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare only; exit 1 if a table differs")
  args = parser.parse_args()
  stale = []
  for path in READMES:
    with open(path) as f:
      text = f.read()
    new = render(text)
    if new == text:
      continue
    names = [m.group("name") for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new)) if m.group(0) != n.group(0)]
    stale += [f"{os.path.relpath(path, ROOT)}: table {name}" for name in names]
    if not args.check:
      with open(path, "w") as f:
        f.write(new)
  if stale:
    print(("stale (run python experiments/tables.py): " if args.check else "rewrote: ") + "; ".join(stale))
  sys.exit(1 if stale and args.check else 0)


if __name__ == "__main__":
  main()
