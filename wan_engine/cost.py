"""What a clip costs on one GPU, from the engine benchmark's measurements (bench/README.md).

A clip's seconds are its expert forwards times the seconds of one, plus what runs once a clip (text
encoding, VAE decode, hand-back of the frames). The two parts matter separately since the 4-step
recipes: at 4 forwards the once-a-clip part is 15 % (A14B 480p) to 65 % (TI2V-5B 720p) of a clip.
Other frame counts scale both parts linearly; other sizes scale a forward with the pixel count to
the power 1.75, what T2V-A14B showed between 480p and 720p (attention grows faster than the rest),
and the once-a-clip part linearly. An estimate for planning and cost, not a promise.
"""

from __future__ import annotations

from typing import NamedTuple

from wan_engine.requests import GenerationRequest
from wan_engine.specs import ModelSpec, get_model_spec


class ClipSeconds(NamedTuple):
    """Measured seconds of one expert forward and of the once-a-clip stages, at the model's official
    frame count."""

    forward: float
    once: float


# bench/results/2026-12-06/engine-distilled-*.json (H200: no H100 run of the distilled recipe is on record):
# denoise / 4 forwards, and encode + decode + hand-back. I2V-A14B: its exact clip on an H100
# (engine-latest.json, 2026-11-22: 217.06 s, 80 forwards) less T2V's once-a-clip part. These predict the
# exact-mode H100 clips of engine-latest.json to within 1 % (T2V 480p 213.1 s for 211.74 s, TI2V 90.8 s
# for 90.27 s).
MEASURED = {
    ("t2v-a14b", 832 * 480): ClipSeconds(forward=10.557 / 4, once=0.051 + 1.848 + 0.065),
    ("t2v-a14b", 1280 * 720): ClipSeconds(forward=40.484 / 4, once=0.048 + 4.216 + 0.153),
    ("i2v-a14b", 832 * 480): ClipSeconds(forward=(217.06 - 1.96) / 80, once=1.96),
    ("ti2v-5b", 1280 * 704): ClipSeconds(forward=3.384 / 4, once=0.036 + 5.927 + 0.211),
}
PIXEL_EXPONENT = 1.75


def estimated_gpu_seconds(model: ModelSpec, request: GenerationRequest) -> float:
    """The seconds a resolved ``request`` would hold one GPU for, with the full-size weights of ``model``'s
    family (a tiny model's clip is costed as the real model making a clip of its size)."""
    measured_at = get_model_spec(model.family)  # the official frame count the figures are for
    pixels = (request.width or model.default_size[0]) * (request.height or model.default_size[1])
    measured = {size: clip for (family, size), clip in MEASURED.items() if family == model.family}
    nearest = min(measured, key=lambda size: abs(size - pixels))
    clip, size_ratio = measured[nearest], pixels / nearest
    # A step with classifier-free guidance runs two expert forwards; a recipe without it runs one.
    forwards = (request.steps or model.steps) * (2 if _guided(request) else 1)
    frames = (request.num_frames or model.num_frames) / measured_at.num_frames
    return frames * (forwards * clip.forward * size_ratio**PIXEL_EXPONENT + clip.once * size_ratio)


def _guided(request: GenerationRequest) -> bool:
    scales = (request.guidance_scale, request.guidance_scale_2)
    return request.guidance_scale is None or any(s is not None and s != 1.0 for s in scales)
