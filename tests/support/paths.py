"""Where the repository and its shipped example adapters are."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_ADAPTERS = REPO / "examples" / "adapters"
