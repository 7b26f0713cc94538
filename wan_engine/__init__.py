"""Wan2.2 models and generation: specs, weights, and a generator that turns requests into frames.

Knows nothing of Prefect, Ray or storage layouts; its callers pass locations and clients in.
"""

from wan_engine.generator import GeneratedVideo, WanGenerator, pick_device
from wan_engine.random_weights import build_random_pipeline, save_random_pipeline
from wan_engine.requests import (
    GenerationRequest,
    InvalidRequestError,
    RequestProblem,
    request_problems,
    resolve_request,
)
from wan_engine.specs import MODEL_FAMILIES, ModelSpec, UnknownModelError, get_model_spec
from wan_engine.weights import materialize, model_location, split_s3_uri

__all__ = [
    "MODEL_FAMILIES",
    "GeneratedVideo",
    "GenerationRequest",
    "InvalidRequestError",
    "ModelSpec",
    "RequestProblem",
    "UnknownModelError",
    "WanGenerator",
    "build_random_pipeline",
    "get_model_spec",
    "materialize",
    "model_location",
    "pick_device",
    "request_problems",
    "resolve_request",
    "save_random_pipeline",
    "split_s3_uri",
]
