"""Wan2.2 models and generation: specs, weights, and a generator that turns requests into frames.

Knows nothing of Prefect, Ray or storage layouts; its callers pass locations and clients in.

The light parts (specs, requests, weight locations) import without torch, so catalogs, planning
and the CLI can check a clip against a model's rules without loading diffusers. The generator and
the random-weight builders are imported on first use of their names.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from wan_engine.adapters import AdapterWeights, adapter_digest, expert_names
from wan_engine.recipes import STANDARD, Recipe, UnknownRecipeError, get_recipe, recipe_names
from wan_engine.requests import (
    MAX_SEED,
    GenerationRequest,
    InvalidRequestError,
    RequestProblem,
    request_problems,
    resolve_request,
)
from wan_engine.specs import MODEL_FAMILIES, ModelSpec, UnknownModelError, Variant, get_model_spec
from wan_engine.weights import materialize, materialize_file, model_location, model_version, split_s3_uri

# diffusers' Wan pipelines import CLIPImageProcessor, which Wan2.2 never uses; without torchvision
# (there is no CPU build of it) transformers warns about it at every import. Quiet that logger alone,
# here, so that it is quiet before any module of the engine imports diffusers.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

if TYPE_CHECKING:
    from wan_engine.generator import EngineOptions, GeneratedVideo, WanGenerator, pick_device
    from wan_engine.random_weights import build_random_pipeline, save_random_lora, save_random_pipeline

# The names that need torch and diffusers, by the module that defines them.
_HEAVY = {
    "EngineOptions": "wan_engine.generator",
    "GeneratedVideo": "wan_engine.generator",
    "WanGenerator": "wan_engine.generator",
    "pick_device": "wan_engine.generator",
    "build_random_pipeline": "wan_engine.random_weights",
    "save_random_pipeline": "wan_engine.random_weights",
    "save_random_lora": "wan_engine.random_weights",
}


def __getattr__(name: str) -> Any:
    module = _HEAVY.get(name)
    if module is None:
        raise AttributeError(f"module 'wan_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "MAX_SEED",
    "MODEL_FAMILIES",
    "STANDARD",
    "AdapterWeights",
    "Recipe",
    "UnknownRecipeError",
    "adapter_digest",
    "expert_names",
    "get_recipe",
    "recipe_names",
    "EngineOptions",
    "GeneratedVideo",
    "GenerationRequest",
    "InvalidRequestError",
    "ModelSpec",
    "RequestProblem",
    "UnknownModelError",
    "Variant",
    "WanGenerator",
    "build_random_pipeline",
    "get_model_spec",
    "materialize",
    "materialize_file",
    "model_location",
    "model_version",
    "pick_device",
    "request_problems",
    "resolve_request",
    "save_random_lora",
    "save_random_pipeline",
    "split_s3_uri",
]
