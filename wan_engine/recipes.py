"""Recipes: the sampling plan a set of weights was trained for, as data.

A recipe says how many denoising steps a clip takes, at which timesteps, with which
scheduler and flow shift, with what classifier-free guidance per expert, where the two
experts of an A14B model hand over, and which adapters (LoRAs) must be fused into the
weights for it. ``standard`` is each model's official plan (its :class:`ModelSpec`'s
defaults); the distilled recipes are the few-step plans their publishers document.

Guidance 1.0 means no classifier-free guidance: one forward per step and no
unconditional pass at all (the distilled models were trained without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from wan_engine.specs import ModelSpec

Scheduler = Literal["unipc", "euler"]
STANDARD = "standard"


@dataclass(frozen=True)
class Recipe:
    """One sampling plan of one model family."""

    name: str
    family: str
    steps: int
    guidance_scale: float  # the high-noise expert's (or the dense model's); 1.0: no unconditional pass
    guidance_scale_2: float | None  # the low-noise expert's; None for a dense model
    flow_shift: float
    # "unipc": the official UniPC multistep solver; "euler": first-order flow matching, the sampler the
    # step-distilled models were trained with (LightX2V's WanStepDistillScheduler is this step:
    # x0 = x - sigma * v, then x_next = x0 + sigma_next * v).
    scheduler: Scheduler
    # The timesteps the distillation was trained at, on the 0..1000 scale before the flow shift
    # (LightX2V's ``denoising_step_list``); None: the scheduler spaces ``steps`` itself.
    timesteps: tuple[int, ...] | None = None
    # Index of the first step the low-noise expert runs (LightX2V's ``boundary_step_index``); None: where
    # the schedule crosses the model's boundary ratio, as the official pipelines decide.
    switch_step: int | None = None
    # Adapters (registry names) fused into the weights at load, with their scales: a generator serves the
    # recipe only when it holds exactly these.
    fused_adapters: tuple[tuple[str, float], ...] = ()
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        if self.timesteps is not None and len(self.timesteps) != self.steps:
            raise ValueError(f"recipe {self.name}: {len(self.timesteps)} timesteps for {self.steps} steps")

    @property
    def fixed_steps(self) -> bool:
        """Whether the steps are part of what the weights learned (a distilled recipe): a clip cannot
        ask for more or fewer."""
        return self.timesteps is not None

    def guided(self, expert_index: int) -> bool:
        """Whether the expert (0: high-noise or dense, 1: low-noise) runs an unconditional pass."""
        scale = self.guidance_scale if expert_index == 0 else self.guidance_scale_2
        return scale is not None and scale != 1.0


def standard_recipe(spec: ModelSpec) -> Recipe:
    """The official plan of ``spec``: its own steps, guidance, shift and boundary, UniPC."""
    return Recipe(
        name=STANDARD,
        family=spec.family,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        guidance_scale_2=spec.guidance_scale_2,
        flow_shift=spec.flow_shift,
        scheduler="unipc",
        source="Wan-Video/Wan2.2 wan/configs",
    )


# LightX2V's Wan2.2 4-step distillation (Wan2.2-Lightning), published as a rank-64 LoRA pair per model
# (lightx2v/Wan2.2-Distill-Loras). ModelTC/LightX2V configs/distill/wan22/wan_moe_{t2v,i2v}_distill_lora.json:
# infer_steps 4, denoising_step_list [1000, 750, 500, 250], boundary_step_index 2, sample_shift 5.0,
# enable_cfg false, lora strength 1.0. The timesteps the experts see are then 1000, 937.5, 833.3 and 625
# (Wan2.2-Lightning's fm_solvers_euler gives the same schedule).
_DISTILL_TIMESTEPS = (1000, 750, 500, 250)
LIGHTX2V_4STEP = "lightx2v-4step"
_SOURCE_4STEP = "ModelTC/LightX2V configs/distill/wan22/wan_moe_*_distill_lora.json"


def _four_step(family: str, adapter: str) -> Recipe:
    return Recipe(
        name=LIGHTX2V_4STEP,
        family=family,
        steps=4,
        guidance_scale=1.0,
        guidance_scale_2=1.0,
        flow_shift=5.0,
        scheduler="euler",
        timesteps=_DISTILL_TIMESTEPS,
        switch_step=2,
        fused_adapters=((adapter, 1.0),),
        source=_SOURCE_4STEP,
    )


DISTILLED_RECIPES: dict[tuple[str, str], Recipe] = {
    (recipe.family, recipe.name): recipe
    for recipe in (
        _four_step("t2v-a14b", "wan2.2-t2v-a14b-lightx2v-4step"),
        _four_step("i2v-a14b", "wan2.2-i2v-a14b-lightx2v-4step"),
    )
}


class UnknownRecipeError(KeyError):
    """A recipe the model family does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


def recipe_names(spec: ModelSpec) -> list[str]:
    return [STANDARD, *sorted(name for family, name in DISTILLED_RECIPES if family == spec.family)]


def get_recipe(spec: ModelSpec, name: str) -> Recipe:
    """The recipe ``name`` of ``spec``'s family (tiny variants share their family's recipes)."""
    if name == STANDARD:
        return standard_recipe(spec)
    recipe = DISTILLED_RECIPES.get((spec.family, name))
    if recipe is None:
        raise UnknownRecipeError(
            f"{spec.family} has no recipe {name!r}; known: {', '.join(recipe_names(spec))}"
        )
    return recipe
