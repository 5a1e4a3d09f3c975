#!/usr/bin/env bash
# The arena in one short GPU visit (issue 26 part 5): `altbench arena experiments/arena.py:gpu-short` (every
# pystdlib entry but the BPE and entropy ones, and the reach group, at ~150x the cpu variant's budget, bf16),
# then its leaderboard, plots and every entry's result and metrics copied to $OUT in a few files:
#
#   OUT=... bash experiments/bench/gpu_arena.sh
#
# leaderboard.md / .json, the plots, entries.jsonl (one line per entry: its arena_result.json and metrics.jsonl)
# and arena.log. Resumable: the arena runs in $ARENA_WORKDIR (default /tmp/arena-gpu-short, outside the
# returned files) and a rerun on the same machine skips finished entries; ARENA_TIMEOUT (default 540 s) stops
# it before a 10-minute call ends, and the copy then holds the entries that finished (the leaderboard only
# when all did). Environment: PYTHON (default python3), SKIP_INSTALL=1, SEEDS (default 1).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT_DIR="${OUT:-$ROOT/experiments/results/arena_gpu_short}"
WORK="${ARENA_WORKDIR:-/tmp/arena-gpu-short}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR" "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${SKIP_INSTALL:-}" ]; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT_DIR/arena.log" 2>&1 || true
fi
timeout "${ARENA_TIMEOUT:-540}" "$PY" -m altbench.cli arena experiments/arena.py:gpu-short --workdir "$WORK" \
  --seeds "${SEEDS:-1}" >> "$OUT_DIR/arena.log" 2>&1
rc=$?
echo "arena exit status $rc" >> "$OUT_DIR/arena.log"
for f in leaderboard.md leaderboard.json bpb_vs_flops.png bpb_vs_kwh.png decode_vs_context.png \
         accuracy_vs_test_compute.png; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT_DIR/"
done
"$PY" - "$WORK" > "$OUT_DIR/entries.jsonl" <<'PYEOF'
import json, os, sys
work = sys.argv[1]
for name in sorted(os.listdir(work)):
  run = os.path.join(work, name)
  result = os.path.join(run, "arena_result.json")
  if not os.path.isfile(result):
    continue
  with open(os.path.join(run, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  print(json.dumps({"name": name, "result": json.load(open(result)), "metrics": lines}))
PYEOF
exit $rc
