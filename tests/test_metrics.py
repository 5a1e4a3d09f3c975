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


def test_rapl_counts_packages_once_not_their_subzones_or_the_platform(tmp_path):
  _zone(tmp_path, "intel-rapl:0", 100_000_000, 1_000_000_000)
  _zone(tmp_path, "intel-rapl:0:0", 50_000_000, 1_000_000_000)  # cores of package 0 (sysfs links it at the top)
  _zone(tmp_path, "intel-rapl:1", 100_000_000, 1_000_000_000)
  (tmp_path / "intel-rapl:1" / "name").write_text("psys\n")      # the platform: packages included
  meter = metrics.EnergyMeter(rapl_root=str(tmp_path))
  meter.start(0.0)
  _zone(tmp_path, "intel-rapl:0", 130_000_000, 1_000_000_000)   # +30 J in the package,
  _zone(tmp_path, "intel-rapl:0:0", 70_000_000, 1_000_000_000)  # 20 J of them in its cores
  _zone(tmp_path, "intel-rapl:1", 190_000_000, 1_000_000_000)
  assert meter.joules(1.0) == pytest.approx(30.0)


class _FakeNVML:
  def nvmlDeviceGetCount(self):
    return 4

  def nvmlDeviceGetHandleByIndex(self, i):
    return f"gpu{i}"

  def nvmlDeviceGetHandleByUUID(self, uuid):
    return uuid


@pytest.mark.parametrize("visible,expected", [(None, ["gpu0", "gpu1", "gpu2", "gpu3"]), ("2", ["gpu2"]),
                                              ("3,GPU-1a2b", ["gpu3", "GPU-1a2b"]), ("", [])])
def test_nvml_reads_only_the_visible_gpus(monkeypatch, visible, expected):
  if visible is None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  else:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
  assert metrics.nvml_handles(_FakeNVML()) == expected


def test_nvml_refuses_a_mig_instance_by_name(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-4f1c")
  with pytest.raises(ValueError, match="MIG-4f1c"):
    metrics.nvml_handles(_FakeNVML())


def test_processes_sum_their_devices_but_a_node_meter_counts_once():
  joules, hosts = [10.0, 10.0, 7.0], [1, 1, 2]  # two processes on node 1 read the same node-wide counter
  assert metrics.combine_energy(joules, hosts, "device") == 27.0
  assert metrics.combine_energy(joules, hosts, "node") == 17.0


def test_energy_plots_name_an_estimate_on_their_face():
  from altbench.train import leaderboard
  measured, est = {"energy_source": "measured (RAPL)"}, {"energy_source": "estimated (30 W stated for cpu)"}
  assert leaderboard.energy_axis_label([measured, measured]) == "energy (kWh), measured"
  assert "ESTIMATED" in leaderboard.energy_axis_label([est, est]) and "every entry" in leaderboard.energy_axis_label([est])
  assert "1 of 2 entries" in leaderboard.energy_axis_label([measured, est])
