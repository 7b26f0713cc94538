"""What a person sees when the object store cannot be used: one line naming the endpoint, soon."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def _wanfactory(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from flows.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_an_endpoint_that_never_answers_fails_within_the_configured_time():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel accepts connections; nothing ever answers them
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        env = {
            **os.environ,
            "WANFACTORY_S3_ENDPOINT": endpoint,
            "WANFACTORY_S3_READ_TIMEOUT_SECONDS": "1",
            "WANFACTORY_S3_RETRIES": "1",
        }
        started = time.monotonic()
        result = _wanfactory(
            "catalog", "validate", "s3://wanfactory/catalogs/sample/catalog.parquet", env=env
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: the object store at {endpoint} did not answer"), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    # Two tries of one second, plus starting Python: minio's defaults would take half an hour.
    assert elapsed < 30


def test_a_refused_credential_fails_at_once_in_one_line(settings, store):
    for key, secret, code in (
        ("no-such-key", "whatever", "InvalidAccessKeyId"),
        (settings.s3_access_key, "a-wrong-secret", "SignatureDoesNotMatch"),
    ):
        env = {**os.environ, "WANFACTORY_S3_ACCESS_KEY": key, "WANFACTORY_S3_SECRET_KEY": secret}
        result = _wanfactory("catalog", "validate", store.uri("catalogs/sample/catalog.parquet"), env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith(
            f"error: the object store at {settings.s3_endpoint} refused the credential ({code})"
        ), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_bad_setting_is_named_in_one_line():
    env = {**os.environ, "WANFACTORY_S3_READ_TIMEOUT_SECONDS": "soon"}
    result = _wanfactory("catalog", "validate", "catalog.parquet", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        "error: WANFACTORY_S3_READ_TIMEOUT_SECONDS='soon': "
        "Input should be a valid number, unable to parse string as a number\n"
    )
