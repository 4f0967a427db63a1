"""Setup run in every process of a local Ray cluster that `condconv sweep` starts itself."""
from __future__ import annotations

import logging

__all__ = ["quiet_state_api_warnings"]

# Ray Train's PlacementGroupCleaner polls the State API, which lives in the dashboard; a local cluster
# runs without one (include_dashboard=False), so every poll warns "Failed to query Ray Train Controller
# actor state" (~160 lines in a 4-minute demo) although nothing is wrong.
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_state_api_warnings() -> None:
    """Raise the PlacementGroupCleaner's log level to ERROR (its State API warnings are noise here)."""
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)
