"""Planning: validated catalog rows and prompt-sheet samples -> clip specs with deterministic ids,
minus what is already done.

Pure logic: the caller supplies what it read from storage (each image's digest, or why it cannot
be used) and the keys already published, so every rule here is testable without storage or GPUs.
The same planning runs in a run and in ``wanfactory catalog validate``, so a catalog that validates
is one the run accepts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from catalogs.adapters import (
    AdapterAsk,
    AdapterRegistry,
    adapter_problems,
    load_adapter_registry,
    with_trigger_words,
)
from catalogs.problems import RowProblem, RowRef
from catalogs.prompts import product_prompt
from catalogs.rules import ModelDefaults, product_seed
from catalogs.schema import CatalogRow, ValidatedCatalog
from catalogs.sheets import SheetReadResult, SheetRules, expand_variants
from infra.settings import Settings
from tasks.postprod.content_filter import PromptPolicy
from tasks.postprod.profile import PostprocessProfile, load_profiles
from tasks.records import ClipSpec, ClipStatus, ManifestEntry
from wan_engine.adapters import AdapterWeights
from wan_engine.recipes import STANDARD, UnknownRecipeError, get_recipe, recipe_names
from wan_engine.requests import GenerationRequest, request_problems, resolve_request
from wan_engine.specs import ModelSpec, UnknownModelError

# The engine's request fields, as catalogs and sheets call them.
_SOURCE_FIELD = {"image": "image_uri", "size": "size", "prompt": "prompt", "seed": "seed"}


def model_defaults(settings: Settings) -> ModelDefaults:
    return ModelDefaults(
        variant=settings.model_variant,
        text_model=settings.default_text_model,
        image_model=settings.default_image_model,
    )


def adapter_registry(settings: Settings) -> AdapterRegistry:
    return load_adapter_registry(settings.adapter_registry, settings.adapter_root)


def sheet_rules(settings: Settings) -> SheetRules:
    """How every reader of a prompt sheet (``ab submit``, the intake watcher, the run) checks it."""
    return SheetRules(
        models=model_defaults(settings),
        postprocess_profiles=frozenset(load_profiles(settings.postprocess_profiles_path)),
        adapters=adapter_registry(settings),
    )


@dataclass(frozen=True, kw_only=True)
class AdapterCheck:
    """What reading a registered adapter's files found: their digest, or why they cannot be used."""

    digest: str | None = None
    problem: str | None = None  # "no file at ...", "access denied ..."


@dataclass(frozen=True, kw_only=True)
class PlanningRules:
    """The run-wide choices planning applies to every row."""

    models: ModelDefaults
    profiles: Mapping[str, PostprocessProfile]  # by name, logo digests filled in
    default_profile: str
    prompt_policy: PromptPolicy
    default_locale: str = "en"
    # family -> digest of the weights it loads (wan_engine.model_version): new weights, new clip ids.
    model_versions: Mapping[str, str | None] = field(default_factory=dict)
    default_recipe: str = STANDARD  # for rows that name none, where their model has it
    adapters: AdapterRegistry = field(default_factory=lambda: AdapterRegistry({}, ""))
    # registry name -> what reading its files found (digests go into clip ids): new bytes, new clips.
    adapter_checks: Mapping[str, AdapterCheck] = field(default_factory=dict)

    def recipe_for(self, spec: ModelSpec, asked: str | None) -> str:
        """The row's recipe, or the run's default where the model has it, else ``standard``."""
        if asked:
            return asked
        return self.default_recipe if self.default_recipe in recipe_names(spec) else STANDARD


@dataclass(frozen=True, kw_only=True)
class ImageCheck:
    """What reading a referenced image found: its digest, or why it cannot be used."""

    sha256: str | None = None
    problem: str | None = None  # "no image found at ...", "cannot be decoded as an image: ..."


@dataclass(frozen=True, kw_only=True)
class Plan:
    clips: list[ClipSpec]  # to generate in this run
    skipped: list[ManifestEntry]  # already published with the same clip id
    rejected: list[ManifestEntry]  # rows that cannot become a clip, with the reason
    refused: list[ManifestEntry]  # clips the prompt policy stopped before any GPU time (quarantined)
    deferred: list[ManifestEntry] = field(default_factory=list)  # planned, not made now (hold_back)
    # Every problem behind ``rejected`` and ``refused``, by row: what `catalog validate` lists.
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def entries(self) -> list[ManifestEntry]:
        """Every entry planning decided by itself (all but the clips to generate)."""
        return [*self.rejected, *self.refused, *self.skipped, *self.deferred]


def hold_back(plan: Plan, run_id: str, *, dry_run: bool = False, limit: int | None = None) -> Plan:
    """The plan with only what this run makes: nothing on a dry run, at most ``limit`` clips otherwise.

    The clips held back are ``planned`` entries with their estimated GPU time, so a manifest shows what
    the run would have cost; a later run makes them (their clip ids are not published).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 clip, got {limit}")
    keep = [] if dry_run else plan.clips[:limit]
    if dry_run:
        reason = "dry run: would be generated"
    else:
        reason = f"past this run's limit of {limit} clips: a later run makes it"
    deferred = [
        ManifestEntry.of_clip(clip, run_id, ClipStatus.PLANNED, stage="plan", reason=reason)
        for clip in plan.clips[len(keep) :]
    ]
    return replace(plan, clips=keep, deferred=[*plan.deferred, *deferred])


def clip_id_for(determinants: Mapping[str, object]) -> str:
    """The clip id: a hash of everything that determines the clip's frames."""
    canonical = json.dumps(determinants, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


@dataclass(frozen=True, kw_only=True)
class ClipInputs:
    """What a catalog row or a prompt-sheet sample asks for, before the model's rules are applied."""

    origin: RowRef
    sample: int | None = None  # A/B samples
    family: str
    request: GenerationRequest  # as the row asks; None fields take the model's defaults
    image_uri: str | None
    profile: str
    recipe: str | None = None  # None: the run's default
    adapters: tuple[AdapterAsk, ...] = ()  # (registry name, scale or None for its default)

    @property
    def identity(self) -> dict[str, object]:
        """What names the clip besides its inputs: the product, or the experiment's variant and sample."""
        if self.origin.sku is not None:
            return {"sku": self.origin.sku}
        return {
            "experiment": self.origin.experiment_id,
            "variant": self.origin.variant_id,
            "sample": self.sample,
        }

    def problem(self, field_name: str, message: str) -> RowProblem:
        return RowProblem(at=self.origin, field=field_name, message=message)


def plan_inputs(
    inputs: ClipInputs, rules: PlanningRules, image: ImageCheck | None
) -> ClipSpec | list[RowProblem]:
    """The clip spec for ``inputs``, or every problem that stops it.

    ``image`` is what reading ``inputs.image_uri`` found (None when there is no image).
    """
    try:
        spec = rules.models.spec_for(inputs.family, has_image=inputs.image_uri is not None)
    except UnknownModelError as err:
        return [inputs.problem("model", str(err))]
    profile = rules.profiles.get(inputs.profile)
    if profile is None:
        known = ", ".join(sorted(rules.profiles))
        return [inputs.problem("postprocess_profile", f"unknown profile {inputs.profile!r}; known: {known}")]
    fused, adapters, problems = _adapters(inputs, spec, rules)
    prompt = inputs.request.prompt
    if adapters:
        prompt = with_trigger_words(prompt, inputs.adapters, rules.adapters)
    request = resolve_request(
        spec,
        replace(
            inputs.request, prompt=prompt, recipe=rules.recipe_for(spec, inputs.recipe), adapters=adapters
        ),
    )
    problems += [
        inputs.problem(_SOURCE_FIELD.get(p.field, p.field), p.message)
        for p in request_problems(spec, request, has_image=inputs.image_uri is not None)
    ]
    if inputs.image_uri and (image is None or image.problem):
        problems.append(
            inputs.problem("image_uri", image.problem if image else f"no image found at {inputs.image_uri}")
        )
    size_problem = profile.size_problem(request.width, request.height)
    if size_problem:
        problems.append(inputs.problem("size", f"profile {profile.name!r}: {size_problem}"))
    if problems:
        return problems
    image_sha256 = image.sha256 if image is not None else None
    determinants = {
        **inputs.identity,
        "model": spec.name,
        "model_version": rules.model_versions.get(spec.family),
        "flow_shift": spec.flow_shift,
        "fps": spec.fps,
        "image_sha256": image_sha256,
        "postprocess": profile.digest(),
        # Only when not the defaults, so that clips made before recipes and adapters keep their ids.
        **({"recipe": request.recipe} if request.recipe != STANDARD else {}),
        **({"recipe_adapters": [list(a.key) for a in fused]} if fused else {}),
        **({"adapters": [list(a.key) for a in request.adapters]} if request.adapters else {}),
        **{k: v for k, v in asdict(request).items() if k not in ("image", "recipe", "adapters")},
    }
    return ClipSpec(
        clip_id=clip_id_for(determinants),
        origin=inputs.origin,
        sample=inputs.sample,
        model=spec,
        request=request,
        image_uri=inputs.image_uri,
        image_sha256=image_sha256,
        profile=profile.name,
        fused_adapters=fused,
    )


def _adapters(
    inputs: ClipInputs, spec: ModelSpec, rules: PlanningRules
) -> tuple[tuple[AdapterWeights, ...], tuple[AdapterWeights, ...], list[RowProblem]]:
    """The adapters the clip's recipe fuses and those it asks for, with their digests; or the problems."""
    problems = []
    fused = []
    try:
        recipe = get_recipe(spec, rules.recipe_for(spec, inputs.recipe))
    except UnknownRecipeError:
        recipe = None  # request_problems names it
    for name, scale in recipe.fused_adapters if recipe else ():
        entry = rules.adapters.entries.get(name)
        check = rules.adapter_checks.get(name)
        if entry is None or entry.family != spec.family:
            problems.append(
                inputs.problem("recipe", f"{recipe.name} needs adapter {name}, not in the registry")
            )
        elif check is None or check.problem:
            why = check.problem if check else "its files were not read"
            problems.append(inputs.problem("recipe", f"{recipe.name} needs adapter {name}: {why}"))
        else:
            fused.append(rules.adapters.weights(name, scale, check.digest))
    asked = []
    problems += [
        inputs.problem("adapters", p) for p in adapter_problems(spec, inputs.adapters, rules.adapters)
    ]
    if not problems:
        for name, scale in inputs.adapters:
            check = rules.adapter_checks.get(name)
            if check is None or check.problem:
                why = check.problem if check else "its files were not read"
                problems.append(inputs.problem("adapters", f"{name}: {why}"))
            else:
                default = rules.adapters.entries[name].default_scale
                asked.append(rules.adapters.weights(name, default if scale is None else scale, check.digest))
    return tuple(fused), tuple(asked), problems


def catalog_inputs(row: CatalogRow, rules: PlanningRules) -> ClipInputs:
    """What a valid catalog row asks for, with the run's defaults."""
    width, height = row.size or (None, None)
    return ClipInputs(
        origin=RowRef(source="catalog", row=row.row, sku=row.sku),
        family=rules.models.family_for(row.model, row.image_uri is not None),
        request=GenerationRequest(
            prompt=product_prompt(row),
            seed=product_seed(row.sku) if row.seed is None else row.seed,
            negative_prompt=row.negative_prompt,
            width=width,
            height=height,
            num_frames=row.num_frames,
            steps=row.steps,
        ),
        image_uri=row.image_uri,
        profile=row.postprocess_profile or rules.default_profile,
        recipe=row.recipe,
        adapters=row.adapters,
    )


def rejection(run_id: str, problems: list[RowProblem], stage: str) -> ManifestEntry:
    """One failed manifest entry for a row, with all of its problems as the reason."""
    return ManifestEntry.of_row(
        problems[0].at, run_id, ClipStatus.FAILED, stage=stage, reason="; ".join(str(p) for p in problems)
    )


class _Triage:
    """Sorts rows into: rejected with their problems, clips to make, already published (skipped), and
    refused by the prompt policy."""

    def __init__(self, rules: PlanningRules, run_id: str, published_keys: Collection[str]) -> None:
        self.rules, self.run_id, self.published = rules, run_id, published_keys
        self.clips: list[ClipSpec] = []
        self.skipped: list[ManifestEntry] = []
        self.refused: list[ManifestEntry] = []
        self.rejected: list[ManifestEntry] = []
        self.problems: list[RowProblem] = []

    def reject(self, problems: list[RowProblem], stage: str, **details: Any) -> None:
        """Rows that cannot become clips: one failed entry per row, with all of its problems."""
        self.problems += problems
        by_row: dict[int | None, list[RowProblem]] = {}
        for problem in problems:
            by_row.setdefault(problem.at.row, []).append(problem)
        self.rejected += [replace(rejection(self.run_id, row, stage), **details) for row in by_row.values()]

    def add(self, inputs: ClipInputs, planned: ClipSpec | list[RowProblem], locale: str | None) -> None:
        if isinstance(planned, list):
            self.reject(planned, "plan", sample=inputs.sample)
            return
        clip = planned
        decision = self.rules.prompt_policy.check(clip.request.prompt, locale, self.rules.default_locale)
        if not decision.allowed:
            refusal = f"prompt refused by the content policy: rule {decision.rule}, locale {decision.locale}"
            problem = inputs.problem("prompt", refusal)
            self.problems.append(problem)
            self.refused.append(
                ManifestEntry.of_clip(
                    clip, self.run_id, ClipStatus.QUARANTINED, stage="prompt_policy", reason=str(problem)
                )
            )
        elif clip.clip_key in self.published:
            self.skipped.append(
                ManifestEntry.of_clip(
                    clip,
                    self.run_id,
                    ClipStatus.SKIPPED,
                    stage="plan",
                    reason="already published with the same inputs",
                    clip_key=clip.clip_key,
                    thumbnail_key=clip.thumbnail_key,
                    preview_key=clip.preview_key,
                )
            )
        else:
            self.clips.append(clip)

    def plan(self) -> Plan:
        return Plan(
            clips=self.clips,
            skipped=self.skipped,
            rejected=sorted(self.rejected, key=lambda entry: entry.row),
            refused=self.refused,
            problems=sorted(self.problems, key=lambda problem: problem.at.row or 0),
        )


def plan_clips(
    catalog: ValidatedCatalog,
    rules: PlanningRules,
    run_id: str,
    images: Mapping[str, ImageCheck],
    published_keys: Collection[str],
) -> Plan:
    """Plan every row: clips to make, clips already published, and rows rejected with reasons.

    ``images`` holds what reading each referenced image found, by its URI.
    """
    triage = _Triage(rules, run_id, published_keys)
    triage.reject(catalog.problems, "validate")
    for row in catalog.rows:
        inputs = catalog_inputs(row, rules)
        image = images.get(row.image_uri) if row.image_uri else None
        triage.add(inputs, plan_inputs(inputs, rules, image), row.locale)
    return triage.plan()


def plan_sheet(
    sheet: SheetReadResult,
    rules: PlanningRules,
    run_id: str,
    images: Mapping[str, ImageCheck],
    published_keys: Collection[str],
) -> Plan:
    """Plan every sample of every valid variant of a prompt sheet; bad rows become failed entries.

    Rows are the spreadsheet's own row numbers, so the manifest points a marketer at the row to fix.
    """
    triage = _Triage(rules, run_id, published_keys)
    triage.reject(sheet.problems, "validate")
    for clip in expand_variants(sheet.variants):
        variant = clip.variant
        inputs = ClipInputs(
            origin=RowRef(
                source="sheet",
                row=variant.row,
                experiment_id=variant.experiment_id,
                variant_id=variant.variant_id,
            ),
            sample=clip.sample,
            family=variant.model,
            request=GenerationRequest(
                prompt=variant.prompt,
                seed=clip.seed,
                negative_prompt=variant.negative_prompt,
                width=variant.width,
                height=variant.height,
            ),
            image_uri=variant.image_uri,
            profile=variant.postprocess_profile or rules.default_profile,
            recipe=variant.recipe,
            adapters=variant.adapters,
        )
        image = images.get(variant.image_uri) if variant.image_uri else None
        triage.add(inputs, plan_inputs(inputs, rules, image), None)
    return triage.plan()
