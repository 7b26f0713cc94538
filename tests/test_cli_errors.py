"""What a person sees when the object store cannot be used (one line naming the endpoint, soon), what a
command does with manifests spooled during an outage, and what a prompt sheet that does not start with
its headers gets."""

from __future__ import annotations

import csv
import io
import os
import socket
import time
from dataclasses import replace

import pytest
from openpyxl import Workbook

from infra.objectstore import ObjectStore
from infra.processes import free_ports
from infra.settings import Settings
from tasks.manifest import write_manifest
from tasks.records import ClipStatus, ManifestEntry
from tests.cli_process import run_wanfactory


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
        result = run_wanfactory(
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
        result = run_wanfactory("catalog", "validate", store.uri("catalogs/sample/catalog.parquet"), env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith(
            f"error: the object store at {settings.s3_endpoint} refused the credential ({code})"
        ), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        (
            "WANFACTORY_GPU_PRICE_PER_HOUR",
            "cheap",
            "error: WANFACTORY_GPU_PRICE_PER_HOUR: not valid JSON (this setting is a JSON object)\n",
        ),
        (
            "WANFACTORY_GPU_PRICE_PER_HOUR",
            '{"H100": -1}',
            "error: WANFACTORY_GPU_PRICE_PER_HOUR['H100']=-1: Input should be greater than or equal to 0\n",
        ),
        (
            "WANFACTORY_ALERT_WEBHOOK_URL",
            "hooks.slack.com/services/T00/B00/s3cr3t-token",
            "error: WANFACTORY_ALERT_WEBHOOK_URL (its value is not shown: a secret): "
            "should be an http:// or https:// URL with a host\n",
        ),
    ],
)
def test_a_bad_table_or_secret_setting_is_named_in_one_line_and_no_secret_is_shown(variable, value, error):
    result = run_wanfactory("config", env={**os.environ, variable: value})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == error
    assert "s3cr3t" not in result.stdout + result.stderr


def test_a_prefect_server_that_does_not_answer_is_named_in_one_line():
    (port,) = free_ports(1)  # nothing listens there
    api = f"http://127.0.0.1:{port}/api"
    result = run_wanfactory("automations", "apply", env={**os.environ, "PREFECT_API_URL": api})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: the Prefect server at {api} did not answer (ConnectError")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def test_a_bad_setting_is_named_in_one_line():
    env = {**os.environ, "WANFACTORY_S3_READ_TIMEOUT_SECONDS": "soon"}
    result = run_wanfactory("catalog", "validate", "catalog.parquet", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        "error: WANFACTORY_S3_READ_TIMEOUT_SECONDS='soon': "
        "Input should be a valid number, unable to parse string as a number\n"
    )


def test_a_manifest_spooled_during_an_outage_is_delivered_by_the_next_command(settings, store, tmp_path):
    """A run that ended while the store was away left its manifest in the local spool; `wanfactory outputs`
    (any command that reaches the store) delivers it first, and then finds it there."""
    state_dir = tmp_path / "state"
    spool = Settings(state_dir=state_dir).manifest_spool_dir
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        away_endpoint = f"127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once closed
    away = ObjectStore(
        replace(settings.object_store(), endpoint=away_endpoint, retries=0, connect_timeout_s=1)
    )
    run_id = "20261206T000000Z-spooled1"
    entry = ManifestEntry(run_id=run_id, row=0, sku="SPOOL-A", status=ClipStatus.FAILED, stage="upload")
    location = write_manifest(away, run_id, "s3://catalogs/spool.parquet", [entry], spool_dir=spool)
    assert location.spooled and not store.exists(location.json_key)

    env = {**os.environ, "WANFACTORY_STATE_DIR": str(state_dir)}
    result = run_wanfactory("outputs", "--run", run_id, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.startswith("delivered 2 manifest files spooled during an outage: "), result.stderr
    assert f"run {run_id} (s3://catalogs/spool.parquet): {{'failed': 1}}" in result.stdout
    assert store.exists(location.json_key) and store.exists(location.parquet_key)
    assert [path for path in spool.rglob("*") if path.is_file()] == []  # delivered, gone from the spool


HEADERS = ["Experiment ID", "Variant ID", "Prompt", "Samples"]
VARIANT = ["sheet-errors", "A", "A speckled mug on a sunlit counter", "1"]


def _xlsx(rows: list[list[str]], merge: str | None = None) -> bytes:
    book = Workbook()
    for row in rows:
        book.active.append(row)
    if merge:
        book.active.merge_cells(merge)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


def _csv(rows: list[list[str]]) -> bytes:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue().encode()


EMPTY_ROW_1 = "error: row 1 must hold the column headers (experiment_id, variant_id, prompt, "
TITLE_ROW_1 = "error: row 1 has no experiment_id and no variant_id column; found: Spring mugs"


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("blank-first-row.xlsx", _xlsx([[], HEADERS, VARIANT]), EMPTY_ROW_1),
        ("merged-title.xlsx", _xlsx([["Spring mugs"], HEADERS, VARIANT], merge="A1:D1"), TITLE_ROW_1),
        ("blank-first-row.csv", b"\r\n" + _csv([HEADERS, VARIANT]), EMPTY_ROW_1),
        ("title-row.csv", _csv([["Spring mugs", "", "", ""], HEADERS, VARIANT]), TITLE_ROW_1),
    ],
)
def test_a_sheet_whose_headers_are_not_in_row_1_fails_in_one_line(
    settings, store, tmp_path, name, data, expected
):
    """A blank first row or a (merged) title row above the headers: the sheet is refused before any run
    starts, in one line naming row 1, with no traceback."""
    sheet = tmp_path / name
    sheet.write_bytes(data)
    env = {**os.environ, "WANFACTORY_STATE_DIR": str(tmp_path / "state")}
    result = run_wanfactory("ab", "submit", str(sheet), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
