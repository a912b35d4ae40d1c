"""Capacity at a latency target: open-loop arrivals from one seeded trace, a rate sweep to
saturation, goodput, and the report (``python -m loadtest.capacity``, ``make capacity``)."""
