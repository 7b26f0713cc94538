"""Weights from an S3 prefix: fetched once per host, fetched again when they change, loaded like real ones."""

from __future__ import annotations

import pytest

from wan_engine import (
    WanGenerator,
    get_model_spec,
    materialize,
    model_location,
    model_version,
    save_random_pipeline,
)


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

    version = model_version(location, store.client)
    key = f"models/weights-test/{spec.folder}/scheduler/scheduler_config.json"
    store.put_bytes(key, store.get_bytes(key) + b"\n", "application/json")
    # New weights under the same name are a new model version (planning puts it in clip ids).
    assert model_version(location, store.client) not in (version, None)
    assert materialize(location, tmp_path, store.client) == local
    assert config.stat().st_mtime_ns != fetched_at and config.read_bytes().endswith(b"\n")

    generator = WanGenerator.from_pretrained(
        location, spec, device="cpu", cache_dir=tmp_path, client=store.client
    )
    assert generator.spec is spec


def test_a_prefix_without_a_pipeline_is_a_clear_error(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no diffusers pipeline"):
        materialize(store.uri("models/nothing-here"), tmp_path, store.client)


def test_model_versions_of_folders_follow_their_files(tmp_path):
    spec = get_model_spec("ti2v-5b", "tiny")
    folder = save_random_pipeline(spec, tmp_path)
    version = model_version(str(folder))
    assert version == model_version(str(folder)) and len(version) == 16
    (folder / "vae" / "config.json").write_text((folder / "vae" / "config.json").read_text() + " ")
    assert model_version(str(folder)) != version
    assert model_version(str(tmp_path / "missing")) is None
