"""Generation requests: what one clip asks of a model, resolved against its defaults and checked.

Resolution and validation are pure functions of a request and a :class:`ModelSpec`,
so a planner can reject a clip before any GPU time is spent, and the generator
applies exactly the same rules before it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from wan_engine.specs import ModelSpec

if TYPE_CHECKING:
    from PIL.Image import Image

# Seeds seed torch.Generator, which takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationRequest:
    """One clip to generate. ``None`` fields take the model's official default."""

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


def resolve_request(spec: ModelSpec, request: GenerationRequest) -> GenerationRequest:
    """Fill every unset field from the model's defaults."""
    width, height = spec.default_size
    return replace(
        request,
        negative_prompt=spec.negative_prompt if request.negative_prompt is None else request.negative_prompt,
        width=request.width or width,
        height=request.height or height,
        num_frames=request.num_frames or spec.num_frames,
        steps=request.steps or spec.steps,
        guidance_scale=spec.guidance_scale if request.guidance_scale is None else request.guidance_scale,
        guidance_scale_2=spec.guidance_scale_2
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
    if request.guidance_scale_2 is not None and not spec.is_moe:
        problems.append(RequestProblem("guidance_scale_2", f"{spec.name} has one expert, not two"))
    if has_image and not spec.accepts_image:
        problems.append(RequestProblem("image", f"{spec.name} is text-to-video and takes no image"))
    if spec.requires_image and not has_image:
        problems.append(RequestProblem("image", f"{spec.name} is image-to-video and needs an image"))
    return problems
