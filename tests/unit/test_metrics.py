"""The RAPL energy reader on a made-up powercap tree: counter wrap-around, and why it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.device_sampler import RaplReader


def _fake_powercap(root: Path, energy_uj: int, max_uj: int = 1_000_000) -> None:
    domain = root / "intel-rapl:0"
    domain.mkdir(parents=True, exist_ok=True)
    (domain / "name").write_text("package-0\n")
    (domain / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (domain / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_reader_handles_counter_wraparound(tmp_path):
    # No RAPL on this VM: the reader runs on a powercap tree of the same layout.
    _fake_powercap(tmp_path, 900_000)
    reader = RaplReader(str(tmp_path))
    assert reader.available
    _fake_powercap(tmp_path, 950_000)
    assert reader.joules_since_last() == pytest.approx(0.05)
    _fake_powercap(tmp_path, 50_000)  # wrapped past 1_000_000
    assert reader.joules_since_last() == pytest.approx(0.1)


def test_rapl_reader_says_why_when_absent(tmp_path):
    reader = RaplReader(str(tmp_path / "nothing-here"))
    assert not reader.available and reader.joules_since_last() is None
    assert "no RAPL package domain" in reader.why_unavailable
