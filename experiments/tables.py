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
READMES = (os.path.join(ROOT, "README.md"), os.path.join(RESULTS, "README.md"), os.path.join(RESULTS, "calibration.md"))


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


CALIBRATION = os.path.join(RESULTS, "calibration")
VERDICTS = ("reproduced", "trend reproduced at reduced scale", "not reproduced")


def calibration_rows():
  """Every claim row of experiments/results/calibration/*.json (written by experiments/calibration/*.py), in file
  order; a row that lacks a field of the schema raises ValueError naming the file."""
  fields = ("paper", "source", "setting", "published", "ours", "seeds", "train_flops", "reduced", "verdict")
  rows = []
  for name in sorted(os.listdir(CALIBRATION)) if os.path.isdir(CALIBRATION) else []:
    if not name.endswith(".json"):
      continue
    path = os.path.join(CALIBRATION, name)
    with open(path) as f:
      claims = json.load(f)
    for i, row in enumerate(claims if isinstance(claims, list) else claims.get("claims", [])):
      missing = [k for k in fields if k not in row]
      if missing or row["verdict"] not in VERDICTS:
        raise ValueError(f"{path}: claim {i} lacks {missing} or has verdict {row.get('verdict')!r} "
                         f"(valid: {VERDICTS})")
      rows.append({**row, "file": name})
  return rows


def _ours(o):
  if o.get("ci") and o["ci"][0] is not None:
    return f"{o['mean']:.3g} [{o['ci'][0]:.3g}, {o['ci'][1]:.3g}]"
  return f"{o['mean']:.3g}"


def calibration_table():
  """One row per claim: paper and source, setting, published, ours (mean [95% CI]), seeds, FLOPs, reduced, verdict."""
  lines = ["| paper | source | setting | published | ours, mean [95% CI] | seeds | training FLOPs | reduced | verdict |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in calibration_rows():
    flops = f"{r['train_flops']:.3g}" if isinstance(r["train_flops"], (int, float)) else str(r["train_flops"])
    lines.append(f"| {r['paper']} | {r['source']} | {r['setting']} | {r['published']} | {_ours(r['ours'])} | "
                 f"{r['seeds']} | {flops} | {r['reduced']} | **{r['verdict']}** |")
  if len(lines) == 2:
    lines.append("| (no calibration results committed yet) | | | | | | | | |")
  return "\n".join(lines)


TABLES = {
    "arena-cpu": lambda: arena_text_group("arena_cpu"),
    "decode-cpu": lambda: decode_ratios("decode_cpu.jsonl"),
    "calibration": calibration_table,
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
