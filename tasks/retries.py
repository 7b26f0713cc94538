"""When a Prefect task's failure is worth another try: storage hiccups, not inputs or credentials that
fail the same way every time."""

from __future__ import annotations

from typing import Any

from catalogs.problems import InputError
from infra.objectstore import refused_credential


def transient(task: Any, task_run: Any, state: Any) -> bool:
    """A ``retry_condition_fn``: retry unless the input is unusable (a missing or malformed catalog, sheet
    or profile) or the object store refused the credential."""
    error = state.result(raise_on_failure=False)
    return not (refused_credential(error) or isinstance(error, FileNotFoundError | InputError))
