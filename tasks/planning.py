"""Planning: validated catalog rows -> clip specs with deterministic ids, minus what is already done.

Pure logic: the caller supplies the image digests it read and the keys already
published, so every rule here is testable without storage or GPUs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass

from catalogs.prompts import product_prompt
from catalogs.schema import CatalogRow, RowProblem, ValidatedCatalog
from tasks.records import ClipSpec, ClipStatus, ManifestEntry
from wan_engine import GenerationRequest, UnknownModelError, get_model_spec, request_problems, resolve_request

# The engine's request fields, as the catalog calls them.
_CATALOG_FIELD = {"image": "image_uri", "size": "size", "prompt": "prompt", "seed": "seed"}


@dataclass(frozen=True)
class PlanningRules:
    """The run-wide choices planning applies to every row."""

    variant: str  # "full" or "tiny"
    default_text_model: str
    default_image_model: str


@dataclass(frozen=True)
class Plan:
    clips: list[ClipSpec]  # to generate in this run
    skipped: list[ManifestEntry]  # already published with the same clip id
    rejected: list[ManifestEntry]  # rows that cannot become a clip, with the reason


def derived_seed(sku: str) -> int:
    """A stable per-product seed, so an unchanged product always gets the same clip."""
    return int.from_bytes(hashlib.sha256(f"wanfactory-seed:{sku}".encode()).digest()[:4], "big")


def clip_id_for(determinants: Mapping[str, object]) -> str:
    """The clip id: a hash of everything that determines the clip's frames."""
    canonical = json.dumps(determinants, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def plan_row(row: CatalogRow, rules: PlanningRules, image_sha256: str | None) -> ClipSpec | list[RowProblem]:
    """The clip spec for one valid row, or every problem that stops it."""
    family = row.model or (rules.default_image_model if row.image_uri else rules.default_text_model)
    try:
        spec = get_model_spec(family, rules.variant)
    except UnknownModelError as err:
        return [RowProblem(row.row, row.sku, "model", str(err))]
    prompt = product_prompt(row)
    width, height = row.size or (None, None)
    request = resolve_request(
        spec,
        GenerationRequest(
            prompt=prompt,
            seed=derived_seed(row.sku) if row.seed is None else row.seed,
            negative_prompt=row.negative_prompt,
            width=width,
            height=height,
        ),
    )
    problems = [
        RowProblem(row.row, row.sku, _CATALOG_FIELD.get(p.field, p.field), p.message)
        for p in request_problems(spec, request, has_image=row.image_uri is not None)
    ]
    if row.image_uri and image_sha256 is None:
        problems.append(RowProblem(row.row, row.sku, "image_uri", f"no image found at {row.image_uri}"))
    if problems:
        return problems
    determinants = {
        "sku": row.sku,
        "model": spec.name,
        "flow_shift": spec.flow_shift,
        "fps": spec.fps,
        "image_sha256": image_sha256,
        **{k: v for k, v in asdict(request).items() if k != "image"},
    }
    return ClipSpec(
        clip_id=clip_id_for(determinants),
        row=row.row,
        sku=row.sku,
        model=spec.name,
        family=spec.family,
        variant=spec.variant,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=request.width,
        height=request.height,
        num_frames=request.num_frames,
        fps=spec.fps,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        guidance_scale_2=request.guidance_scale_2,
        seed=request.seed,
        image_uri=row.image_uri,
        image_sha256=image_sha256,
        prompt_sha256=hashlib.sha256(request.prompt.encode()).hexdigest(),
    )


def rejection(run_id: str, problems: list[RowProblem], stage: str) -> ManifestEntry:
    """One failed manifest entry for a row, with all of its problems as the reason."""
    return ManifestEntry(
        run_id=run_id,
        row=problems[0].row,
        sku=problems[0].sku,
        status=ClipStatus.FAILED,
        stage=stage,
        reason="; ".join(str(p) for p in problems),
    )


def plan_clips(
    catalog: ValidatedCatalog,
    rules: PlanningRules,
    run_id: str,
    image_digests: Mapping[str, str | None],
    published_keys: Collection[str],
) -> Plan:
    """Plan every row: clips to make, clips already published, and rows rejected with reasons."""
    by_row: dict[int, list[RowProblem]] = {}
    for problem in catalog.problems:
        by_row.setdefault(problem.row, []).append(problem)
    rejected = [rejection(run_id, problems, "validate") for problems in by_row.values()]
    clips, skipped = [], []
    for row in catalog.rows:
        planned = plan_row(row, rules, image_digests.get(row.image_uri) if row.image_uri else None)
        if isinstance(planned, list):
            rejected.append(rejection(run_id, planned, "plan"))
        elif planned.clip_key in published_keys:
            skipped.append(
                ManifestEntry.for_spec(
                    planned,
                    run_id,
                    ClipStatus.SKIPPED,
                    stage="plan",
                    reason="already published with the same inputs",
                    clip_key=planned.clip_key,
                    thumbnail_key=planned.thumbnail_key,
                )
            )
        else:
            clips.append(planned)
    rejected.sort(key=lambda entry: entry.row)
    return Plan(clips=clips, skipped=skipped, rejected=rejected)
