"""Planning: validated catalog rows -> clip specs with deterministic ids, minus what is already done.

Pure logic: the caller supplies the image digests it read and the keys already
published, so every rule here is testable without storage or GPUs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field

from catalogs.prompts import product_prompt
from catalogs.schema import CatalogRow, RowProblem, ValidatedCatalog
from catalogs.sheets import SheetProblem, SheetReadResult, expand_variants
from tasks.postprod.content_filter import PromptPolicy
from tasks.postprod.profile import PostprocessProfile
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
    profiles: Mapping[str, PostprocessProfile]  # by name, logo digests filled in
    default_profile: str
    prompt_policy: PromptPolicy
    default_locale: str = "en"
    # family -> digest of the weights it loads (wan_engine.model_version): new weights, new clip ids.
    model_versions: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    clips: list[ClipSpec]  # to generate in this run
    skipped: list[ManifestEntry]  # already published with the same clip id
    rejected: list[ManifestEntry]  # rows that cannot become a clip, with the reason
    refused: list[ManifestEntry]  # clips the prompt policy stopped before any GPU time (quarantined)


def derived_seed(sku: str) -> int:
    """A stable per-product seed, so an unchanged product always gets the same clip."""
    return int.from_bytes(hashlib.sha256(f"wanfactory-seed:{sku}".encode()).digest()[:4], "big")


def clip_id_for(determinants: Mapping[str, object]) -> str:
    """The clip id: a hash of everything that determines the clip's frames."""
    canonical = json.dumps(determinants, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class ClipInputs:
    """What a catalog row or a prompt-sheet sample asks for, before the model's rules are applied."""

    row: int
    label: str  # the SKU, or "<experiment>/<variant>" for an A/B sample
    family: str
    prompt: str
    negative_prompt: str | None
    seed: int
    size: tuple[int, int] | None
    image_uri: str | None
    profile: str
    identity: dict[str, object]  # what names the clip besides its inputs (sku, or experiment/variant/sample)
    num_frames: int | None = None  # None: the model's defaults
    steps: int | None = None
    experiment_id: str | None = None
    variant_id: str | None = None
    sample: int | None = None


def plan_inputs(
    inputs: ClipInputs, rules: PlanningRules, image_sha256: str | None
) -> ClipSpec | list[tuple[str, str]]:
    """The clip spec for ``inputs``, or every (field, message) problem that stops it."""
    try:
        spec = get_model_spec(inputs.family, rules.variant)
    except UnknownModelError as err:
        return [("model", str(err))]
    profile = rules.profiles.get(inputs.profile)
    if profile is None:
        return [
            (
                "postprocess_profile",
                f"unknown profile {inputs.profile!r}; known: {', '.join(sorted(rules.profiles))}",
            )
        ]
    width, height = inputs.size or (None, None)
    request = resolve_request(
        spec,
        GenerationRequest(
            prompt=inputs.prompt,
            seed=inputs.seed,
            negative_prompt=inputs.negative_prompt,
            width=width,
            height=height,
            num_frames=inputs.num_frames,
            steps=inputs.steps,
        ),
    )
    problems = [
        (_CATALOG_FIELD.get(p.field, p.field), p.message)
        for p in request_problems(spec, request, has_image=inputs.image_uri is not None)
    ]
    if inputs.image_uri and image_sha256 is None:
        problems.append(("image_uri", f"no image found at {inputs.image_uri}"))
    size_problem = profile.size_problem(request.width, request.height)
    if size_problem:
        problems.append(("size", f"profile {profile.name!r}: {size_problem}"))
    if problems:
        return problems
    determinants = {
        **inputs.identity,
        "model": spec.name,
        "model_version": rules.model_versions.get(spec.family),
        "flow_shift": spec.flow_shift,
        "fps": spec.fps,
        "image_sha256": image_sha256,
        "postprocess": profile.digest(),
        **{k: v for k, v in asdict(request).items() if k != "image"},
    }
    return ClipSpec(
        clip_id=clip_id_for(determinants),
        row=inputs.row,
        sku=inputs.label,
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
        image_uri=inputs.image_uri,
        image_sha256=image_sha256,
        prompt_sha256=hashlib.sha256(request.prompt.encode()).hexdigest(),
        profile=profile.name,
        experiment_id=inputs.experiment_id,
        variant_id=inputs.variant_id,
        sample=inputs.sample,
    )


def plan_row(row: CatalogRow, rules: PlanningRules, image_sha256: str | None) -> ClipSpec | list[RowProblem]:
    """The clip spec for one valid catalog row, or every problem that stops it."""
    inputs = ClipInputs(
        row=row.row,
        label=row.sku,
        family=row.model or (rules.default_image_model if row.image_uri else rules.default_text_model),
        prompt=product_prompt(row),
        negative_prompt=row.negative_prompt,
        seed=derived_seed(row.sku) if row.seed is None else row.seed,
        size=row.size,
        image_uri=row.image_uri,
        profile=row.postprocess_profile or rules.default_profile,
        identity={"sku": row.sku},
        num_frames=row.num_frames,
        steps=row.steps,
    )
    planned = plan_inputs(inputs, rules, image_sha256)
    if isinstance(planned, ClipSpec):
        return planned
    return [RowProblem(row.row, row.sku, field, message) for field, message in planned]


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


class _Triage:
    """Sorts planned clips into: to make, already published (skipped), refused by the prompt policy."""

    def __init__(self, rules: PlanningRules, run_id: str, published_keys: Collection[str]) -> None:
        self.rules, self.run_id, self.published = rules, run_id, published_keys
        self.clips: list[ClipSpec] = []
        self.skipped: list[ManifestEntry] = []
        self.refused: list[ManifestEntry] = []

    def add(self, planned: ClipSpec, locale: str | None) -> None:
        decision = self.rules.prompt_policy.check(planned.prompt, locale or self.rules.default_locale)
        if not decision.allowed:
            reason = f"prompt refused by the content policy: rule {decision.rule}, locale {decision.locale}"
            self.refused.append(
                ManifestEntry.for_spec(
                    planned, self.run_id, ClipStatus.QUARANTINED, stage="prompt_policy", reason=reason
                )
            )
        elif planned.clip_key in self.published:
            self.skipped.append(
                ManifestEntry.for_spec(
                    planned,
                    self.run_id,
                    ClipStatus.SKIPPED,
                    stage="plan",
                    reason="already published with the same inputs",
                    clip_key=planned.clip_key,
                    thumbnail_key=planned.thumbnail_key,
                    preview_key=planned.preview_key,
                )
            )
        else:
            self.clips.append(planned)

    def plan(self, rejected: list[ManifestEntry]) -> Plan:
        rejected.sort(key=lambda entry: entry.row)
        return Plan(clips=self.clips, skipped=self.skipped, rejected=rejected, refused=self.refused)


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
    triage = _Triage(rules, run_id, published_keys)
    for row in catalog.rows:
        planned = plan_row(row, rules, image_digests.get(row.image_uri) if row.image_uri else None)
        if isinstance(planned, list):
            rejected.append(rejection(run_id, planned, "plan"))
        else:
            triage.add(planned, row.locale)
    return triage.plan(rejected)


def plan_sheet(
    sheet: SheetReadResult,
    rules: PlanningRules,
    run_id: str,
    image_digests: Mapping[str, str | None],
    published_keys: Collection[str],
) -> Plan:
    """Plan every sample of every valid variant of a prompt sheet; bad rows become failed entries.

    Rows are the spreadsheet's own row numbers, so the manifest points a marketer at the row to fix.
    """
    by_row: dict[int, list[SheetProblem]] = {}
    for problem in sheet.problems:
        by_row.setdefault(problem.row or 0, []).append(problem)
    rejected = [
        ManifestEntry(
            run_id=run_id,
            row=row,
            sku=None,
            status=ClipStatus.FAILED,
            stage="validate",
            reason="; ".join(str(p) for p in problems),
            experiment_id=problems[0].experiment_id,
            variant_id=problems[0].variant_id,
        )
        for row, problems in by_row.items()
    ]
    triage = _Triage(rules, run_id, published_keys)
    for clip in expand_variants(sheet.variants):
        label = f"{clip.experiment_id}/{clip.variant_id}"
        inputs = ClipInputs(
            row=clip.row,
            label=label,
            family=clip.model,
            prompt=clip.prompt,
            negative_prompt=clip.negative_prompt,
            seed=clip.seed,
            size=(clip.width, clip.height),
            image_uri=clip.image_uri,
            profile=clip.postprocess_profile or rules.default_profile,
            identity={"experiment": clip.experiment_id, "variant": clip.variant_id, "sample": clip.sample},
            experiment_id=clip.experiment_id,
            variant_id=clip.variant_id,
            sample=clip.sample,
        )
        planned = plan_inputs(inputs, rules, image_digests.get(clip.image_uri) if clip.image_uri else None)
        if isinstance(planned, list):
            reason = "; ".join(f"row {clip.row}, column {field!r}: {message}" for field, message in planned)
            rejected.append(
                ManifestEntry(
                    run_id=run_id,
                    row=clip.row,
                    sku=label,
                    status=ClipStatus.FAILED,
                    stage="plan",
                    reason=reason,
                    experiment_id=clip.experiment_id,
                    variant_id=clip.variant_id,
                    sample=clip.sample,
                )
            )
        else:
            triage.add(planned, None)
    return triage.plan(rejected)
