"""Load tests, the comparison driver, and the helpers they share for running servers."""
