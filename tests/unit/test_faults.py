"""The test-only fault hook's spec (engines/faults.py), parsed and checked."""

from __future__ import annotations

import pytest

from engines import faults


def test_fault_spec_is_checked():
    assert faults.parse("error:A@3, oom:B") == (faults.Fault("error", "A", 3), faults.Fault("oom", "B", 1))
    with pytest.raises(ValueError, match="KIND:MARKER"):
        faults.parse("explode:X")
