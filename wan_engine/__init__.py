"""Wan2.2 models and generation: specs, weights, and a generator that turns requests into frames.

Knows nothing of Prefect, Ray or storage layouts; its callers pass locations and clients in.
"""

import logging

# diffusers' Wan pipelines import CLIPImageProcessor, which Wan2.2 never uses; without torchvision
# (there is no CPU build of it) transformers warns about it at every import. Quiet that logger alone.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

# ruff: noqa: E402 - the logger is quieted before diffusers is imported

from wan_engine.generator import EngineOptions, GeneratedVideo, WanGenerator, pick_device
from wan_engine.random_weights import build_random_pipeline, save_random_pipeline
from wan_engine.requests import (
    GenerationRequest,
    InvalidRequestError,
    RequestProblem,
    request_problems,
    resolve_request,
)
from wan_engine.specs import MODEL_FAMILIES, ModelSpec, UnknownModelError, get_model_spec
from wan_engine.weights import materialize, model_location, model_version, split_s3_uri

__all__ = [
    "MODEL_FAMILIES",
    "EngineOptions",
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
    "model_version",
    "pick_device",
    "request_problems",
    "resolve_request",
    "save_random_pipeline",
    "split_s3_uri",
]
