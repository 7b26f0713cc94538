"""The names of the project's deployments and runs, stated once.

Light on purpose (no Prefect, no Ray): the CLI, the intake watcher, ``wanfactory serve`` and the
flows all import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import PurePosixPath

NIGHTLY_DEPLOYMENT = "nightly-catalog/nightly"
AB_DEPLOYMENT = "ab-batch/ab"
INTAKE_DEPLOYMENT = "intake-watcher/intake"
DEPLOYMENTS = (NIGHTLY_DEPLOYMENT, AB_DEPLOYMENT, INTAKE_DEPLOYMENT)


def ab_run_name(experiments: Sequence[str]) -> str:
    """``ab-<experiment>``, or the experiments joined with '+' when a sheet holds several."""
    return "ab-" + ("+".join(experiments) if experiments else "empty-sheet")


def ab_tags(experiments: Sequence[str]) -> list[str]:
    """``experiment:<id>`` for each experiment, so people find a sheet's runs in the UI."""
    return [f"experiment:{e}" for e in experiments]


def nightly_run_name() -> str:
    return f"nightly-{datetime.now(UTC):%Y-%m-%d}"


def catalog_name(catalog_uri: str) -> str:
    """A catalog's short name for tags: its folder ('sample' for .../catalogs/sample/catalog.parquet)."""
    return PurePosixPath(catalog_uri.split("://", 1)[-1]).parent.name or catalog_uri
