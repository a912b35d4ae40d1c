"""Load tests, the comparison driver, and the measuring harness that bench/ builds on.

Imports run one way: bench/ -> loadtest/ -> server/, engines/; nothing here imports bench/.
"""

from pathlib import Path

# The repository: servers start here and report folders land under it, wherever the command ran from.
ROOT = Path(__file__).resolve().parent.parent
