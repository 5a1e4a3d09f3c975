"""Generated README tables equal what their committed raw files give (experiments/tables.py)."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tables():
  spec = importlib.util.spec_from_file_location("tables", os.path.join(ROOT, "experiments", "tables.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_generated_table_matches_its_raw_file():
  tables = _tables()
  seen = set()
  for path in tables.READMES:
    with open(path) as f:
      text = f.read()
    seen |= {m.group("name") for m in tables.BLOCK.finditer(text)}
    assert tables.render(text) == text, f"{path}: a generated table is stale; run python experiments/tables.py"
  assert seen == set(tables.TABLES), f"tables defined but placed in no README: {set(tables.TABLES) - seen}"


def test_a_changed_number_is_caught():
  tables = _tables()
  with open(tables.READMES[0]) as f:
    text = f.read()
  block = next(m for m in tables.BLOCK.finditer(text) if m.group("name") == "arena-cpu")
  edited = text.replace(block.group("body"), block.group("body").replace("1.985", "1.975"))
  assert edited != text and tables.render(edited) == text
  with pytest.raises(KeyError, match="no-such"):
    tables.render("<!-- table:no-such -->\nx\n<!-- /table:no-such -->")


def test_calibration_rows_follow_the_schema(tmp_path, monkeypatch):
  tables = _tables()
  monkeypatch.setattr(tables, "CALIBRATION", str(tmp_path))
  row = {"paper": "P", "source": "Table 1", "setting": "s", "published": "0.9", "seeds": 3, "train_flops": 1e12,
         "ours": {"mean": 0.5, "ci": [0.4, 0.6], "per_seed": [0.4, 0.5, 0.6]}, "reduced": "width",
         "verdict": "not reproduced"}
  (tmp_path / "p.json").write_text(json.dumps([row]))
  assert "| P | Table 1 | s | 0.9 | 0.5 [0.4, 0.6] | 3 | 1e+12 | width | **not reproduced** |" in tables.calibration_table()
  (tmp_path / "q.json").write_text(json.dumps([{**row, "verdict": "close enough"}]))
  with pytest.raises(ValueError, match="q.json"):
    tables.calibration_table()
