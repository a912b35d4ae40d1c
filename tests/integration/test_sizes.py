"""`make sizes` on a tiny shape: built as GGUF and bfloat16 by the same code as the big sizes, served by
llama-cpp and hf-kv through yayi-serve, measured and reported."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bench.sizes import build, measure

pytestmark = [pytest.mark.llama_cpp, pytest.mark.slow]

SHAPE = str(Path(__file__).resolve().parents[1] / "data" / "tiny_size_shape.json")
TINY = json.loads(Path(SHAPE).read_text())["name"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("YAYI_SIZES_ROOT", str(root / "cache"))
        assert build.main(["--sizes", SHAPE, "--formats", "Q4_0,bf16"]) == 0
        out = root / "report"
        argv = ["--sizes", SHAPE, "--formats", "Q4_0,bf16", "--engines", "llama-cpp,hf-kv", "--refuse", ""]
        argv += ["--decode-tokens", "12", "--prompt-tokens", "128", "--probe-seconds", "1", "--out", str(out)]
        argv += ["--peer-sizes", TINY, "--peer-rounds", "2"]
        assert measure.main(argv) == 0
    return out


def test_each_format_is_served_and_measured(report):
    with open(report / "sizes.csv") as handle:
        rows = {(r["Format"], r["Engine"]): r for r in csv.DictReader(handle)}
    assert set(rows) == {("Q4_0", "llama-cpp"), ("Q4_0", "llama-server"), ("bf16", "hf-kv")}
    peer = rows.pop(("Q4_0", "llama-server"))
    assert "2 rounds interleaved with ours" in peer["Notes"] and float(peer["Speed (tokens/s)"]) > 0
    for row in rows.values():
        # every slot's stream cut, and a new request still got its first token
        assert float(row["after cancel (s)"]) > 0
        assert row["Notes"] == ""
        assert float(row["start-up (s)"]) > 0
        assert float(row["Mem (MB)"]) >= 0.9 * float(row["idle MB"]) > 0
        assert float(row["Speed (tokens/s)"]) > 0 and float(row["decode 4 users (tok/s)"]) > 0
        assert float(row["prefill 128 (tok/s)"]) > 0
        # a roofline is a ceiling: a measurement above it would mean the bytes or the probe are wrong
        assert 0 < float(row["% of bound"]) <= 100
    # the Q4_0 file is held to its own bytes, a quarter-odd of the bfloat16 weights
    assert float(rows[("Q4_0", "llama-cpp")]["weights MB"]) < 0.5 * float(rows[("bf16", "hf-kv")]["weights MB"])


def test_the_report_has_its_plot_and_the_log_row_apart(report):
    assert (report / "decode_by_size.png").stat().st_size > 0
    assert "For scale only" in (report / "sizes.md").read_text()
    assert "30.76" in (report / "log_row.csv").read_text()
