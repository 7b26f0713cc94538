"""The ``wanfactory`` command in a process of its own, as a person or cron starts it: its entry point
(``flows.cli:main``) through this interpreter, so the tests need no console script on the PATH."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WANFACTORY = (sys.executable, "-c", "from flows.cli import main; main()")


def run_wanfactory(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``wanfactory ARGS...`` run to its end from the repository root, its output captured as text."""
    return subprocess.run(
        [*WANFACTORY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
