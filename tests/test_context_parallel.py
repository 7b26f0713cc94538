"""One clip across two processes (diffusers' context parallelism, wan_engine.parallel) on the CPU.

Two processes joined by gloo each load the same tiny model and generate the same request with
``EngineOptions(context_parallel=True)``; their frames must be those of one ordinary process. The
tiny transformers have 2 attention heads, so 2 processes use Ulysses (the heads split across ranks),
the layout A14B (40 heads) and TI2V-5B (24) use on 2 and 4 GPUs. Each rank also records the token
count its transformer blocks saw: half the clip's, or nothing was split.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import WanTransformer3DModel
from PIL import Image

from infra.processes import free_ports
from wan_engine import GenerationRequest, WanGenerator, get_model_spec, save_random_pipeline
from wan_engine.generator import EngineOptions
from wan_engine.parallel import context_parallel_degrees, enable_context_parallel

WORLD_SIZE = 2
STEPS = 12  # crosses the A14B expert boundary (8 high-noise steps, 4 low-noise)


def _image() -> Image.Image:
    pixels = np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# (case, model family, with an image): TI2V with an image gives the transformer per-token timesteps,
# which the context-parallel plan splits along with the tokens.
CASES = (("t2v-a14b", "t2v-a14b", False), ("ti2v-5b", "ti2v-5b", False), ("ti2v-5b-image", "ti2v-5b", True))


def _request(with_image: bool) -> GenerationRequest:
    return GenerationRequest(
        prompt="a red sneaker on a turntable", seed=7, steps=STEPS, image=_image() if with_image else None
    )


def _tokens_seen(generator: WanGenerator) -> dict[str, list[int]]:
    """The token count each expert's second block receives, per call (the first block does the split)."""
    seen: dict[str, list[int]] = {name: [] for name in generator.experts}
    for name, expert in generator.experts.items():
        expert.blocks[1].register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].shape[1])
        )
    return seen


def _rank_main(rank: int, port: int, folders: dict[str, str], out_dir: str) -> None:
    """One rank: join the group, generate every case with context parallelism, save frames."""
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        for case, family, with_image in CASES:
            spec = get_model_spec(family, "tiny")
            generator = WanGenerator.from_pretrained(
                folders[family], spec, device="cpu", options=EngineOptions(context_parallel=True)
            )
            tokens = _tokens_seen(generator)
            video = generator.generate(_request(with_image))
            np.save(Path(out_dir) / f"{case}-rank{rank}.npy", video.frames)
            results[case] = {"tokens": tokens, "expert_calls": video.expert_calls}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
        # 3 heads do not split over 2 ranks: ring attention, which PyTorch's SDPA (native) cannot run.
        arch = get_model_spec("t2v-a14b", "tiny").architecture.transformer
        try:
            enable_context_parallel(WanTransformer3DModel(**{**arch, "num_attention_heads": 3}))
        except ValueError as error:
            (Path(out_dir) / f"ring-rank{rank}.txt").write_text(str(error))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        family: str(save_random_pipeline(get_model_spec(family, "tiny"), root))
        for family in ("t2v-a14b", "ti2v-5b")
    }


@pytest.mark.timeout(240)
def test_one_clip_on_two_processes_gives_the_frames_of_one(tiny_folders, tmp_path):
    (port,) = free_ports(1)
    mp.spawn(_rank_main, args=(port, tiny_folders, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    for case, family, with_image in CASES:
        spec = get_model_spec(family, "tiny")
        single = WanGenerator.from_pretrained(tiny_folders[family], spec, device="cpu")
        tokens = _tokens_seen(single)
        reference = single.generate(_request(with_image))
        full_tokens = {name: set(counts) for name, counts in tokens.items()}
        for rank, result in enumerate(ranks):
            # Every expert ran, on half the tokens per rank: the sequence really was split.
            assert result[case]["expert_calls"] == reference.expert_calls, (case, rank)
            for name, counts in result[case]["tokens"].items():
                assert len(counts) == len(tokens[name]) > 0, (case, name)
                assert {count * WORLD_SIZE for count in counts} == full_tokens[name], (case, name, counts)
            frames = np.load(tmp_path / f"{case}-rank{rank}.npy")
            assert frames.shape == reference.frames.shape, case
            difference = np.abs(frames.astype(np.int16) - reference.frames.astype(np.int16))
            # float32 on the CPU: the split changes matmul shapes, so values move by float rounding only.
            assert difference.max() <= 2 and difference.mean() < 0.01, (case, rank, difference.max())
        # Every rank ends with the whole clip, the same one.
        assert np.array_equal(
            np.load(tmp_path / f"{case}-rank0.npy"), np.load(tmp_path / f"{case}-rank1.npy")
        )
    for rank in range(WORLD_SIZE):
        message = (tmp_path / f"ring-rank{rank}.txt").read_text()
        assert "needs ring attention" in message and "'native'" in message and "_native_cudnn" in message


def test_layout_is_ulysses_when_the_heads_divide_else_ring():
    assert context_parallel_degrees(40, 2) == (1, 2) and context_parallel_degrees(40, 4) == (1, 4)
    assert context_parallel_degrees(24, 4) == (1, 4) and context_parallel_degrees(40, 3) == (3, 1)
    with pytest.raises(ValueError, match="at least 2 processes"):
        context_parallel_degrees(40, 1)


def test_context_parallel_without_a_process_group_is_a_clear_error(tiny_folders):
    assert not dist.is_initialized()
    spec = get_model_spec("ti2v-5b", "tiny")
    with pytest.raises(ValueError, match="torch.distributed initialized"):
        WanGenerator.from_pretrained(
            tiny_folders["ti2v-5b"], spec, device="cpu", options=EngineOptions(context_parallel=True)
        )
