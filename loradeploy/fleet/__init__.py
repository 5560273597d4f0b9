"""Many adapters × targets from one spec (``loradeploy fleet``): units keyed by the sha256 of
their inputs, the base's graph shared across a target's artifacts, a local process pool by
default, shards for CI matrices, Ray for clusters."""

from .run import FleetConfig, merge_shards, run_fleet
from .spec import load_spec

__all__ = ["FleetConfig", "load_spec", "merge_shards", "run_fleet"]
