"""The energy ledger: RAPL counters (with wrap-around) when readable, a labelled estimate otherwise."""

import pytest

from altbench.train import metrics


def _zone(root, name, energy_uj, max_uj):
  d = root / name
  d.mkdir(parents=True, exist_ok=True)
  (d / "energy_uj").write_text(str(energy_uj))
  (d / "max_energy_range_uj").write_text(str(max_uj))


def test_rapl_counters_are_integrated_across_wraparound(tmp_path):
  _zone(tmp_path, "intel-rapl:0", 900_000_000, 1_000_000_000)
  _zone(tmp_path, "intel-rapl:1", 5_000_000, 1_000_000_000)
  meter = metrics.EnergyMeter(rapl_root=str(tmp_path))
  assert meter.source == "measured (RAPL)"
  meter.start(0.0)
  _zone(tmp_path, "intel-rapl:0", 950_000_000, 1_000_000_000)   # +50 J
  _zone(tmp_path, "intel-rapl:1", 7_000_000, 1_000_000_000)     # +2 J
  assert meter.joules(1.0) == pytest.approx(52.0)
  _zone(tmp_path, "intel-rapl:0", 10_000_000, 1_000_000_000)    # wrapped: +60 J
  assert meter.joules(2.0) == pytest.approx(112.0)


def test_estimate_is_power_times_time_and_labelled(tmp_path):
  meter = metrics.EnergyMeter(power_w=40.0, rapl_root=str(tmp_path / "none"))
  assert meter.source.startswith("estimated (40 W")
  meter.start(10.0)
  assert meter.joules(12.5) == pytest.approx(100.0)
