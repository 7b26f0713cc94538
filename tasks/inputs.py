"""What planning reads from storage, read the same way by a run and by ``wanfactory catalog validate``:
whether each referenced image is there and decodes, which weights each model loads, and the run's
planning rules from settings.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from minio.error import S3Error
from PIL import Image

from catalogs.adapters import AdapterRegistry
from catalogs.problems import InputError, InvalidValue
from catalogs.rules import locale_tag
from catalogs.sources import read_bytes
from infra.objectstore import ObjectStore
from infra.settings import Settings
from tasks.planning import AdapterCheck, ImageCheck, PlanningRules, adapter_registry, model_defaults
from tasks.postproduction import Postproduction
from wan_engine.adapters import adapter_digest
from wan_engine.specs import MODEL_FAMILIES, get_model_spec
from wan_engine.weights import model_location, model_version

# Reading images is I/O bound: a few threads hide the object store's latency.
_IMAGE_THREADS = 8


def local_image_roots(settings: Settings, source_uri: str) -> list[Path]:
    """The folders a source may name local images in: the configured ones and a local source's own."""
    own = [] if source_uri.startswith("s3://") else [Path(source_uri).expanduser().resolve().parent]
    return [*(root.expanduser().resolve() for root in settings.local_image_roots), *own]


def check_image(uri: str, store: ObjectStore, local_roots: Sequence[Path]) -> ImageCheck:
    """The image's digest if it can be read and decoded, else why not (as the generator would fail).

    A local path is read only inside ``local_roots`` (links resolved first): a catalog cannot make the
    pipeline read /etc/passwd or another user's files.
    """
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser().resolve()
        if not any(path.is_relative_to(root) for root in local_roots):
            allowed = ", ".join(str(root) for root in local_roots) or "none are configured"
            return ImageCheck(
                problem=f"{uri} is outside the folders local images are read from ({allowed}); "
                "put the image next to the catalog, in WANFACTORY_LOCAL_IMAGE_ROOTS, or in the object store"
            )
    try:
        data = read_bytes(uri, store.client)
    except FileNotFoundError:
        return ImageCheck(problem=f"no image found at {uri}")
    except Exception as err:
        return ImageCheck(problem=f"cannot read {uri}: {type(err).__name__}: {err}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as err:
        return ImageCheck(problem=f"{uri} cannot be decoded as an image: {type(err).__name__}: {err}")
    return ImageCheck(sha256=hashlib.sha256(data).hexdigest())


def check_images(
    uris: Iterable[str | None], store: ObjectStore, local_roots: Sequence[Path]
) -> dict[str, ImageCheck]:
    """:func:`check_image` for every distinct URI, a few at a time."""
    unique = sorted({uri for uri in uris if uri})
    with ThreadPoolExecutor(_IMAGE_THREADS) as pool:
        checks = pool.map(lambda uri: check_image(uri, store, local_roots), unique)
        return dict(zip(unique, checks, strict=True))


def _default_locale(settings: Settings) -> str:
    try:
        return locale_tag(settings.content_locale)
    except InvalidValue as err:
        raise InputError(f"WANFACTORY_CONTENT_LOCALE: {err}") from None


def planning_rules(settings: Settings, postproduction: Postproduction, store: ObjectStore) -> PlanningRules:
    """The rules a run plans with: settings, the post-production setup, and the weights' versions."""
    versions = {
        family: model_version(
            model_location(settings.model_root, get_model_spec(family, settings.model_variant)), store.client
        )
        for family in MODEL_FAMILIES
    }
    return PlanningRules(
        models=model_defaults(settings),
        profiles=postproduction.profiles,
        default_profile=postproduction.default_profile,
        prompt_policy=postproduction.prompt_policy,
        default_locale=_default_locale(settings),
        model_versions=versions,
        default_recipe=settings.default_recipe,
        adapters=(registry := adapter_registry(settings)),
        adapter_checks=check_adapters(registry, store),
    )


def check_adapters(registry: AdapterRegistry, store: ObjectStore) -> dict[str, AdapterCheck]:
    """Every registered adapter's digest (an ETag listing, or a hash of local files), or why its files
    cannot be read: a missing file fails the rows that name the adapter, not the run."""
    checks = {}
    for name, entry in registry.entries.items():
        files = entry.files(registry.root)
        try:
            checks[name] = AdapterCheck(digest=adapter_digest(files, store.client))
        except FileNotFoundError as err:
            checks[name] = AdapterCheck(problem=f"no adapter file at {err.filename}")
        except S3Error as err:
            if err.code not in ("NoSuchKey", "NoSuchBucket"):
                raise  # the store's own failure (credentials, outage): the run's, not the row's
            uri = next(uri for _, uri in files if err.object_name and uri.endswith(err.object_name))
            checks[name] = AdapterCheck(problem=f"no adapter file at {uri}")
    return checks
