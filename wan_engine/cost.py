"""What a clip costs on one GPU, from the engine benchmark's measurements (bench/README.md).

Seconds for a whole clip in exact mode on one H100 80GB (text encoding, denoising, decode), for each
model at the sizes measured, at the model's official steps and frames. Other steps and frames scale
linearly, per expert forward (a recipe without classifier-free guidance runs one a step, not two);
other sizes scale with the pixel count to the power 1.75, what T2V-A14B showed between 480p and 720p
(attention grows faster than the rest). An estimate for planning and cost, not a promise.
"""

from __future__ import annotations

from wan_engine.requests import GenerationRequest
from wan_engine.specs import ModelSpec, get_model_spec

# bench/results/engine-latest.json (2026-11-22, H100): ours' seconds per clip. T2V-A14B 720p: 22.83 s a
# step on one GPU (bench/results/context-parallel-latest.json, H200), times 40 steps.
H100_SECONDS = {
    ("t2v-a14b", 832 * 480): 211.74,
    ("i2v-a14b", 832 * 480): 217.06,
    ("ti2v-5b", 1280 * 704): 90.27,
    ("t2v-a14b", 1280 * 720): 913.2,
}
PIXEL_EXPONENT = 1.75


def estimated_gpu_seconds(model: ModelSpec, request: GenerationRequest) -> float:
    """The seconds a resolved ``request`` would hold one H100 for, with the full-size weights of ``model``'s
    family (a tiny model's clip is costed as the real model making a clip of its size)."""
    measured_at = get_model_spec(model.family)  # the official steps and frames the figures are for
    pixels = (request.width or model.default_size[0]) * (request.height or model.default_size[1])
    measured = {size: seconds for (family, size), seconds in H100_SECONDS.items() if family == model.family}
    nearest = min(measured, key=lambda size: abs(size - pixels))
    seconds = measured[nearest] * (pixels / nearest) ** PIXEL_EXPONENT
    # Measured with classifier-free guidance: two expert forwards a step. A recipe without it runs one.
    forwards = (request.steps or model.steps) * (2 if _guided(request) else 1) / (2 * measured_at.steps)
    frames = (request.num_frames or model.num_frames) / measured_at.num_frames
    return seconds * forwards * frames


def _guided(request: GenerationRequest) -> bool:
    scales = (request.guidance_scale, request.guidance_scale_2)
    return request.guidance_scale is None or any(s is not None and s != 1.0 for s in scales)
