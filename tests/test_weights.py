"""Weights from an S3 prefix: fetched once per host, fetched again when they change, loaded like real ones."""

from __future__ import annotations

import pytest

from wan_engine import WanGenerator, get_model_spec, materialize, model_location, save_random_pipeline


@pytest.fixture(scope="module")
def uploaded(store, tmp_path_factory):
    spec = get_model_spec("ti2v-5b", "tiny")
    folder = save_random_pipeline(spec, tmp_path_factory.mktemp("build"))
    store.upload_folder(folder, f"models/weights-test/{spec.folder}")
    return spec, model_location(store.uri("models/weights-test"), spec)


def test_weights_are_fetched_once_and_again_when_changed(store, uploaded, tmp_path):
    spec, location = uploaded
    local = materialize(location, tmp_path, store.client)
    config = local / "scheduler" / "scheduler_config.json"
    fetched_at = config.stat().st_mtime_ns
    assert materialize(location, tmp_path, store.client) == local
    assert config.stat().st_mtime_ns == fetched_at  # the cache answered

    key = f"models/weights-test/{spec.folder}/scheduler/scheduler_config.json"
    store.put_bytes(key, store.get_bytes(key) + b"\n", "application/json")
    assert materialize(location, tmp_path, store.client) == local
    assert config.stat().st_mtime_ns != fetched_at and config.read_bytes().endswith(b"\n")

    generator = WanGenerator.from_pretrained(
        location, spec, device="cpu", cache_dir=tmp_path, client=store.client
    )
    assert generator.spec is spec


def test_a_prefix_without_a_pipeline_is_a_clear_error(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusers pipeline"):
        materialize(store.uri("models/nothing-here"), tmp_path, store.client)
