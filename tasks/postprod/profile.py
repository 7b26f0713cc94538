"""Post-production profiles: named sets of stage parameters, read from TOML.

A profile says how every stage treats a clip (see ``profiles/default.toml``). Profiles are
data: each sub-table is passed to its stage's parameters (:func:`tasks.postprod.params.stage_params`),
so a field name the stage does not know, or a value of the wrong type, choice or range, is an error
naming the profile and the table, raised when the run starts rather than halfway through it.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from catalogs.problems import InputError
from tasks.postprod.content_filter import FrameFilterParams
from tasks.postprod.motion import ConformParams, StabilizeParams
from tasks.postprod.overlay import VisibleWatermarkParams
from tasks.postprod.params import stage_params
from tasks.postprod.periodic_mark import PeriodicMarkParams, periodic_size_problem
from tasks.postprod.preview import PreviewParams

DEFAULT_PROFILES_PATH = Path(__file__).with_name("profiles") / "default.toml"


class ProfileError(InputError):
    """A profiles file or a profile name that cannot be used."""


@stage_params
class DeliveryParams:
    """Delivery size: clips whose shorter side is below ``min_short_side`` are upscaled to it (0: never)."""

    min_short_side: int = 0

    def delivered_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) a generated clip is delivered at: aspect kept, sides even for yuv420p."""
        short = min(width, height)
        if short >= self.min_short_side:
            return width, height
        factor = self.min_short_side / short
        return _even(width * factor), _even(height * factor)


def _even(value: float) -> int:
    return max(2, int(round(value / 2)) * 2)


@stage_params
class ProvenanceSwitch:
    """Whether clips are signed with C2PA; the certificates come from settings, not profiles."""

    enabled: bool = True


@dataclass(frozen=True)
class PostprocessProfile:
    """Every stage's parameters for the clips of one profile.

    The visible watermark's logo is referenced by ``logo_uri`` as written in the profile and
    found at ``logo_location`` (read by the finishing worker, once per process);
    ``visible_watermark.logo`` stays None here so profiles stay small and picklable. The run
    fills in ``logo_sha256`` (:meth:`with_logo_digest`) so that a new logo under the same key
    changes the clip ids too.
    """

    name: str
    description: str = ""
    delivery: DeliveryParams = DeliveryParams()
    stabilize: StabilizeParams = StabilizeParams()
    conform: ConformParams = ConformParams()
    visible_watermark: VisibleWatermarkParams = VisibleWatermarkParams()
    logo_uri: str | None = None
    logo_location: str | None = None
    logo_sha256: str | None = None
    invisible_watermark: PeriodicMarkParams = PeriodicMarkParams()
    content_filter: FrameFilterParams = FrameFilterParams()
    provenance: ProvenanceSwitch = ProvenanceSwitch()
    preview: PreviewParams = PreviewParams()

    def describe(self) -> dict[str, Any]:
        """The profile as plain values: what the manifest records and the clip id hashes."""
        return {
            "name": self.name,
            "delivery": asdict(self.delivery),
            "stabilize": asdict(self.stabilize),
            "conform": asdict(self.conform),
            "visible_watermark": {
                **self.visible_watermark.describe(),
                "logo_uri": self.logo_uri,
                "logo_sha256": self.logo_sha256,
            },
            "invisible_watermark": self.invisible_watermark.to_dict(),
            "content_filter": {
                **asdict(self.content_filter),
                "blocked_labels": dict(self.content_filter.blocked_labels),
            },
            "provenance": asdict(self.provenance),
            "preview": asdict(self.preview),
        }

    def digest(self) -> str:
        """A short hash of :meth:`describe`: part of every clip id made with this profile."""
        canonical = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def with_logo_digest(self, logo: bytes | None) -> PostprocessProfile:
        """This profile with the digest of its logo's bytes (None: no logo)."""
        return replace(self, logo_sha256=None if logo is None else hashlib.sha256(logo).hexdigest())

    def size_problem(self, width: int, height: int) -> str | None:
        """Why a clip generated at ``width`` x ``height`` cannot go through this profile, or None."""
        if not self.invisible_watermark.enabled:
            return None
        delivered = self.delivery.delivered_size(width, height)
        problem = periodic_size_problem(*delivered)
        if problem and delivered != (width, height):
            problem = f"delivered at {delivered[0]}x{delivered[1]}: {problem}"
        return problem

    def conform_for(self, source_fps: int) -> ConformParams:
        """The conform parameters for a clip at ``source_fps`` (``target_fps = 0`` keeps the model's rate)."""
        if self.conform.target_fps == 0:
            return replace(self.conform, target_fps=source_fps)
        return self.conform


# Each TOML sub-table and the dataclass its fields go to.
_SECTIONS: dict[str, type] = {
    "delivery": DeliveryParams,
    "stabilize": StabilizeParams,
    "conform": ConformParams,
    "visible_watermark": VisibleWatermarkParams,
    "invisible_watermark": PeriodicMarkParams,
    "content_filter": FrameFilterParams,
    "provenance": ProvenanceSwitch,
    "preview": PreviewParams,
}


def _section(profile: str, section: str, table: dict[str, Any]) -> tuple[Any, str | None]:
    cls = _SECTIONS[section]
    values = dict(table)
    logo_uri = values.pop("logo_uri", None) if section == "visible_watermark" else None
    known = {f.name for f in fields(cls)} - {"logo"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ProfileError(
            f"profile '{profile}', table [{section}]: unknown fields {unknown}; known: {sorted(known)}"
        )
    try:
        return cls(**values), logo_uri
    except ValidationError as err:
        problems = "; ".join(
            (f"{'.'.join(map(str, error['loc']))}: " if error["loc"] else "")
            + error["msg"].removeprefix("Value error, ")
            for error in err.errors()
        )
        raise ProfileError(f"profile '{profile}', table [{section}]: {problems}") from None


def parse_profiles(document: dict[str, Any], base: Path) -> dict[str, PostprocessProfile]:
    """Profiles from a parsed TOML document; ``base`` is where relative logo paths start."""
    profiles = {}
    for name, table in document.items():
        if not isinstance(table, dict):
            raise ProfileError(f"'{name}' is not a profile table")
        extra = sorted(set(table) - set(_SECTIONS) - {"description"})
        if extra:
            raise ProfileError(f"profile '{name}': unknown tables {extra}; known: {sorted(_SECTIONS)}")
        parts: dict[str, Any] = {}
        logo_uri = None
        for section in _SECTIONS:
            if section in table:
                parts[section], uri = _section(name, section, table[section])
                logo_uri = uri or logo_uri
        location = logo_uri
        if logo_uri and "://" not in logo_uri and not Path(logo_uri).is_absolute():
            location = str((base / logo_uri).resolve())
        profiles[name] = PostprocessProfile(
            name=name,
            description=table.get("description", ""),
            logo_uri=logo_uri,
            logo_location=location,
            **parts,
        )
    if not profiles:
        raise ProfileError("no profiles defined")
    return profiles


def load_profiles(path: Path | None = None) -> dict[str, PostprocessProfile]:
    """The named profiles in ``path`` (default: the packaged ``profiles/default.toml``)."""
    path = path or DEFAULT_PROFILES_PATH
    try:
        document = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ProfileError(f"cannot read post-processing profiles from {path}: {err}") from err
    return parse_profiles(document, Path(path).resolve().parent)
