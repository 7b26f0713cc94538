"""Generation requests: what one clip asks of a model, resolved against its defaults and checked.

Resolution and validation are pure functions of a request and a :class:`ModelSpec`,
so a planner can reject a clip before any GPU time is spent, and the generator
applies exactly the same rules before it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from wan_engine.adapters import AdapterWeights, expert_names
from wan_engine.recipes import STANDARD, Recipe, UnknownRecipeError, get_recipe, standard_recipe
from wan_engine.specs import ModelSpec

if TYPE_CHECKING:
    from PIL.Image import Image

# Seeds seed torch.Generator, which takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationRequest:
    """One clip to generate. ``None`` fields take the recipe's default (the model's official one for
    the ``standard`` recipe)."""

    prompt: str
    seed: int
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    image: Image | None = None  # the conditioning image (i2v, ti2v)
    recipe: str = STANDARD  # the sampling plan (wan_engine.recipes)
    adapters: tuple[AdapterWeights, ...] = ()  # per-clip adapters, applied unfused at their scales


@dataclass(frozen=True)
class RequestProblem:
    """One reason a request cannot run, naming the field at fault."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidRequestError(ValueError):
    """A request the model cannot run; ``problems`` lists every field at fault."""

    def __init__(self, model: str, problems: list[RequestProblem]) -> None:
        self.problems = problems
        super().__init__(f"{model}: " + "; ".join(str(p) for p in problems))


def request_recipe(spec: ModelSpec, request: GenerationRequest) -> Recipe:
    """The request's recipe; the standard one when the model has no such recipe (a problem that
    :func:`request_problems` reports)."""
    try:
        return get_recipe(spec, request.recipe)
    except UnknownRecipeError:
        return standard_recipe(spec)


def resolve_request(spec: ModelSpec, request: GenerationRequest) -> GenerationRequest:
    """Fill every unset field from the recipe's and the model's defaults."""
    width, height = spec.default_size
    recipe = request_recipe(spec, request)
    return replace(
        request,
        negative_prompt=spec.negative_prompt if request.negative_prompt is None else request.negative_prompt,
        width=request.width or width,
        height=request.height or height,
        num_frames=request.num_frames or spec.num_frames,
        steps=request.steps or recipe.steps,
        guidance_scale=recipe.guidance_scale if request.guidance_scale is None else request.guidance_scale,
        guidance_scale_2=recipe.guidance_scale_2
        if request.guidance_scale_2 is None
        else request.guidance_scale_2,
    )


def request_problems(spec: ModelSpec, request: GenerationRequest, has_image: bool) -> list[RequestProblem]:
    """Every reason a resolved request cannot run on ``spec`` (empty when it can).

    ``has_image`` is passed separately so a planner can check a clip whose image it
    has located but not loaded.
    """
    problems = []
    if not request.prompt.strip():
        problems.append(RequestProblem("prompt", "is empty"))
    if not 0 <= request.seed <= MAX_SEED:
        problems.append(RequestProblem("seed", f"{request.seed} is outside 0 to {MAX_SEED}"))
    size = (request.width, request.height)
    if size not in spec.sizes:
        allowed = ", ".join(f"{w}x{h}" for w, h in spec.sizes)
        problems.append(
            RequestProblem("size", f"{size[0]}x{size[1]} is not one of {spec.name}'s sizes ({allowed})")
        )
    frames = request.num_frames
    if frames is None or frames % 4 != 1 or not 1 <= frames <= spec.max_frames:
        problems.append(
            RequestProblem(
                "num_frames", f"{frames} must be 4k+1 and at most {spec.max_frames} for {spec.name}"
            )
        )
    if request.steps is None or request.steps < 1:
        problems.append(RequestProblem("steps", f"{request.steps} must be at least 1"))
    try:
        recipe = get_recipe(spec, request.recipe)
    except UnknownRecipeError as err:
        problems.append(RequestProblem("recipe", str(err)))
    else:
        if recipe.fixed_steps and request.steps != recipe.steps:
            problems.append(
                RequestProblem(
                    "steps",
                    f"recipe {recipe.name} runs exactly {recipe.steps} steps (the timesteps its weights "
                    f"were distilled at), not {request.steps}",
                )
            )
    experts = expert_names(spec)
    for adapter in request.adapters:
        strange = [expert for expert, _ in adapter.files if expert not in experts]
        if strange or not adapter.files:
            problems.append(
                RequestProblem(
                    "adapters",
                    f"{adapter.name} has files for {', '.join(strange) or 'no expert'}; "
                    f"{spec.name}'s experts are {', '.join(experts)}",
                )
            )
    if request.guidance_scale_2 is not None and not spec.is_moe:
        problems.append(RequestProblem("guidance_scale_2", f"{spec.name} has one expert, not two"))
    if has_image and not spec.accepts_image:
        problems.append(RequestProblem("image", f"{spec.name} is text-to-video and takes no image"))
    if spec.requires_image and not has_image:
        problems.append(RequestProblem("image", f"{spec.name} is image-to-video and needs an image"))
    return problems
