"""Upload benchmark: publishing clips to the real S3 server (Ceph RGW), through the project's own code path.

    python3 -m bench.upload --out bench/results

The fleet benchmark runs on a GPU machine where the real object store cannot run; this measures the
upload side on the CPU machine instead. It

- starts a one-node Ceph cluster (``infra.object_store_server.CephObjectStore``) in a scratch directory
  on free ports, exactly as the tests' conftest does, and stops it at the end;
- makes the files one published clip consists of, at the delivered sizes of the ``standard`` profile:
  TI2V-5B 1280x704, 121 frames at 24 fps, and A14B 832x480, 81 frames at 16 fps conformed to 121 at
  24 fps. The video is a synthetic textured scene (zoom, pan, a moving object, a little shimmer)
  encoded by ``tasks.encode.encode_mp4`` at the chain's delivery crf; the thumbnail and the animated
  WebP preview come from ``encode_thumbnail`` and ``write_preview`` with the profile's parameters;
- publishes clips with ``tasks.publish.publish_clip`` (thumbnail, preview, video: ``ObjectStore.put_file``
  with the clip's user metadata, each put followed by a stat), one fresh ``ObjectStore`` per clip as
  ``finish_clip`` makes one, from 1, 4 and 8 concurrent uploader threads, a few repetitions each;
- uploads a large object (200 MB by default) through the same ``put_file``, which the minio SDK sends
  as a multipart upload, as it does model weights and any clip over its 5 MiB part size;
- writes ``upload-latest.json`` under ``--out`` and prints a markdown summary last.

MB is 10^6 bytes. Client and server share this machine's cores: the CPU seconds each side spends per MB
are recorded too, so the numbers can be read for a machine where the store runs elsewhere.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import logging
import math
import os
import platform
import secrets
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from minio import Minio
from minio.helpers import get_part_info
from pydantic import SecretStr

from bench.common import cpu_name
from bench.postprocess import spec_for
from catalogs.problems import RowRef
from infra.object_store_server import CephObjectStore, ObjectStoreServerConfig
from infra.objectstore import ObjectStore
from infra.processes import free_ports, read_pid_file
from infra.settings import ObjectStoreConfig
from tasks.encode import encode_mp4, encode_thumbnail
from tasks.postprod.chain import DELIVERY_CRF
from tasks.postprod.preview import write_preview
from tasks.postprod.profile import load_profiles
from tasks.publish import publish_clip
from tasks.records import FinishedClip, GeneratedClip

BUCKET = "wanfactory-bench"
PROFILE = "standard"
MB = 1e6
# name -> (width, height, delivered frames, delivered fps, what the model makes): the standard profile
# delivers 24 fps, so A14B's 81 frames at 16 fps are published as 121 frames.
CLIPS = {
    "ti2v-5b": (1280, 704, 121, 24, "TI2V-5B 1280x704, 121 f @ 24 fps"),
    "a14b": (832, 480, 121, 24, "A14B 832x480, 81 f @ 16 fps -> 121 f @ 24 fps"),
}
# Per-pixel noise (8-bit levels) added to every frame. Without it x264 predicts the synthetic motion
# almost perfectly (~0.10 bits/pixel at crf 18); at 3 levels it starts coding the noise itself (~0.5).
# 2 levels lands at ~0.18 bits/pixel (~3.9 Mbit/s at 720p24), within what crf 18 gives detailed footage.
SHIMMER = 2.0
SERVER_DAEMONS = ("mon.a", "osd.0", "client.rgw.a")

log = logging.getLogger("bench.upload")


@dataclass(frozen=True)
class ClipFiles:
    """The three files of one published clip, and the facts its metadata carries."""

    name: str
    width: int
    height: int
    frames: int
    fps: int
    video: Path
    thumbnail: Path
    preview: Path
    sizes: dict[str, int]  # taken when made: the files go with the scratch directory, the sizes stay

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def _texture(
    height: int, width: int, rng: np.random.Generator, cells: tuple[int, ...], falloff: float
) -> np.ndarray:
    """Smooth noise summed over scales, coarse to fine: detail at every scale, like a photographed scene."""
    image = np.zeros((height, width, 3), np.float32)
    amplitude = 1.0
    for cell in cells:
        grid = rng.normal(0, 1, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        image += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        amplitude *= falloff
    return (image - image.mean((0, 1))) / image.std()


def textured_scene(width: int, height: int, frames: int, seed: int = 0) -> np.ndarray:
    """uint8 (frames, height, width, 3): a textured backdrop under a slow zoom, pan and roll, with a
    textured disc turning as it crosses the frame, and a faint per-frame shimmer.

    A plain translation would let x264 predict every block exactly; zoom and rotation make it code
    real residuals, as it must for generated footage.
    """
    rng = np.random.default_rng(seed)
    backdrop = np.clip(128 + 45 * _texture(2 * height, 2 * width, rng, (256, 96, 32, 12, 4), 0.55), 0, 255)
    side = int(height * 0.6)
    disc = np.clip(150 + 60 * _texture(side, side, rng, (64, 16, 4), 0.7), 0, 255)
    yy, xx = np.mgrid[0:side, 0:side]
    radius = side / 2
    mask = (((yy - radius) ** 2 + (xx - radius) ** 2) < (0.8 * radius) ** 2).astype(np.float32)
    mask = cv2.GaussianBlur(mask, (0, 0), 3)[..., None]
    video = np.empty((frames, height, width, 3), np.uint8)
    top = height // 5
    for t in range(frames):
        s = t / frames
        view = cv2.getRotationMatrix2D((width, height), 4 * s, 1.0 + 0.25 * s)
        view[:, 2] -= (width / 2 + 60 * s * width / 1280, height / 2)
        frame = cv2.warpAffine(backdrop, view, (width, height), flags=cv2.INTER_LINEAR)
        turned = cv2.warpAffine(disc, cv2.getRotationMatrix2D((radius, radius), 90 * s, 1.0), (side, side))
        left = int(width * (0.15 + 0.5 * s))
        region = frame[top : top + side, left : left + side]
        region[:] = region * (1 - mask) + turned * mask
        frame += rng.normal(0, SHIMMER, (height, width, 1)).astype(np.float32)
        video[t] = np.clip(frame, 0, 255)
    return video


def make_clip_files(name: str, out_dir: Path, threads: int) -> ClipFiles:
    """Encode one clip's video, thumbnail and preview with the project's own functions."""
    width, height, frames, fps, _ = CLIPS[name]
    video_frames = textured_scene(width, height, frames)
    out_dir.mkdir(parents=True, exist_ok=True)
    video = encode_mp4(video_frames, fps, out_dir / f"{name}.mp4", crf=DELIVERY_CRF, threads=threads)
    thumbnail = encode_thumbnail(video_frames, out_dir / f"{name}.jpg")
    preview = out_dir / f"{name}.webp"
    write_preview(video_frames, fps, preview, load_profiles()[PROFILE].preview)
    sizes = {
        "video_bytes": video.stat().st_size,
        "thumbnail_bytes": thumbnail.stat().st_size,
        "preview_bytes": preview.stat().st_size,
    }
    return ClipFiles(name, width, height, frames, fps, video, thumbnail, preview, sizes)


def finished_clip(files: ClipFiles, clip_id: str) -> FinishedClip:
    """A FinishedClip over ``files`` as the chain would hand it to publish_clip (unique keys per call)."""
    spec = replace(
        spec_for(files.name, files.width, files.height, files.frames, files.fps, profile=PROFILE),
        clip_id=clip_id,
        origin=RowRef(source="catalog", row=0, sku=f"BENCH-{files.name.upper()}"),
    )
    generated = GeneratedClip(clip=spec, frames=None, worker="bench", engine_mode="exact")
    return FinishedClip(
        generated=generated,
        video_path=files.video,
        thumbnail_path=files.thumbnail,
        preview_path=files.preview,
        frame_count=files.frames,
        fps=files.fps,
        width=files.width,
        height=files.height,
        stages=(),
        watermark_payload="0123456789ab",
    )


class CpuMeter:
    """CPU seconds of this process (the client, all threads) and of the Ceph daemons (the server)."""

    def __init__(self, server: CephObjectStore) -> None:
        self.pids = [read_pid_file(server.run_dir / f"{name}.pid") for name in SERVER_DAEMONS]
        self.tick = os.sysconf("SC_CLK_TCK")

    def server_seconds(self) -> float:
        total = 0
        for pid in self.pids:
            if pid is None:
                continue
            # utime and stime are fields 14 and 15; the command name before them may contain spaces.
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        return total / self.tick

    def sample(self) -> tuple[float, float]:
        return time.process_time(), self.server_seconds()


def publish_round(
    config: ObjectStoreConfig, files: ClipFiles, uploaders: int, clips_each: int, tag: str, meter: CpuMeter
) -> dict:
    """``uploaders`` threads each publish ``clips_each`` clips; wall time, rates and CPU of the round."""
    latencies: list[float] = []
    lock = threading.Lock()

    def uploader(index: int) -> None:
        for i in range(clips_each):
            started = time.perf_counter()
            # finish_clip opens one ObjectStore (one minio client and connection pool) per clip.
            entry = publish_clip(
                ObjectStore(config), finished_clip(files, f"{tag}-u{index}-{i}"), "bench-run"
            )
            elapsed = time.perf_counter() - started
            assert entry.clip_key is not None
            with lock:
                latencies.append(elapsed)

    with ThreadPoolExecutor(max_workers=uploaders) as pool:
        client0, server0 = meter.sample()
        started = time.perf_counter()
        for future in [pool.submit(uploader, index) for index in range(uploaders)]:
            future.result()
        wall = time.perf_counter() - started
        client1, server1 = meter.sample()
    clips = uploaders * clips_each
    megabytes = clips * files.total_bytes / MB
    return {
        "clips": clips,
        "wall_s": wall,
        "mb_s": megabytes / wall,
        "clips_s": clips / wall,
        "objects_s": 3 * clips / wall,
        "clip_latency_s": statistics.median(latencies),
        "latencies": latencies,
        "client_cpu_s_per_mb": (client1 - client0) / megabytes,
        "server_cpu_s_per_mb": (server1 - server0) / megabytes,
    }


def measure_publish(
    config: ObjectStoreConfig,
    files: ClipFiles,
    concurrency: list[int],
    repeats: int,
    clips_per_uploader: int,
    meter: CpuMeter,
) -> tuple[dict, float]:
    """Median rates per concurrency over ``repeats`` rounds, and the median seconds to publish one clip
    with one uploader (every single-uploader clip of every round)."""
    # A first clip pays for connection setup and for the bucket index's first writes: not timed.
    publish_round(config, files, 1, 2, f"warm-{files.name}", meter)
    results, single = {}, []
    for uploaders in concurrency:
        # At least 8 clips a round, so one uploader's round is not a few hundred milliseconds of noise.
        clips_each = max(clips_per_uploader, math.ceil(8 / uploaders))
        rounds = [
            publish_round(config, files, uploaders, clips_each, f"{files.name}-c{uploaders}-r{rep}", meter)
            for rep in range(repeats)
        ]
        if uploaders == 1:
            single = [latency for r in rounds for latency in r["latencies"]]
        results[str(uploaders)] = {
            "uploaders": uploaders,
            "clips_per_round": rounds[0]["clips"],
            **{
                key: round(statistics.median(r[key] for r in rounds), 4)
                for key in (
                    "mb_s",
                    "clips_s",
                    "objects_s",
                    "clip_latency_s",
                    "client_cpu_s_per_mb",
                    "server_cpu_s_per_mb",
                )
            },
            "rounds_mb_s": [round(r["mb_s"], 2) for r in rounds],
        }
        done = results[str(uploaders)]
        print(
            f"  {files.name} uploaders={uploaders}: {done['mb_s']:.1f} MB/s, {done['clips_s']:.2f} clips/s "
            f"(rounds {done['rounds_mb_s']})",
            flush=True,
        )
    publish_s = statistics.median(single) if single else float("nan")
    return results, publish_s


def measure_multipart(store: ObjectStore, scratch: Path, size_mb: int, repeats: int, meter: CpuMeter) -> dict:
    """put_file of one ``size_mb`` MB object, ``repeats`` times: median MB/s, and how minio splits it."""
    path = scratch / "large.bin"
    size = size_mb * 1_000_000
    # Random bytes: weights and encoded video do not compress, and RGW stores what it gets.
    with path.open("wb") as out:
        for _ in range(size_mb):
            out.write(os.urandom(1_000_000))
    part_size, parts = get_part_info(size, 0)  # what fput_object picks with its default part_size=0
    parallel = inspect.signature(Minio.fput_object).parameters["num_parallel_uploads"].default
    rates, client_cpu, server_cpu = [], [], []
    for rep in range(repeats):
        key = f"models/bench/large-{rep}.bin"
        client0, server0 = meter.sample()
        started = time.perf_counter()
        store.put_file(key, path, "application/octet-stream")
        rates.append(size / MB / (time.perf_counter() - started))
        client1, server1 = meter.sample()
        client_cpu.append((client1 - client0) / (size / MB))
        server_cpu.append((server1 - server0) / (size / MB))
        if store.client.stat_object(store.bucket, key).size != size:
            raise RuntimeError(f"{key}: stored size differs from {size}")
        print(f"  multipart {size_mb} MB rep {rep}: {rates[-1]:.1f} MB/s", flush=True)
    path.unlink()
    return {
        "bytes": size,
        "part_size": part_size,
        "parts": parts,
        "parallel_part_uploads": parallel,
        "mb_s": round(statistics.median(rates), 2),
        "rounds_mb_s": [round(rate, 2) for rate in rates],
        "client_cpu_s_per_mb": round(statistics.median(client_cpu), 4),
        "server_cpu_s_per_mb": round(statistics.median(server_cpu), 4),
    }


def check_published(store: ObjectStore, files: ClipFiles, expected_clips: int) -> None:
    """Check every clip arrived, byte for byte, with its metadata: a run that lost data measured nothing."""
    keys = list(store.list_keys(f"clips/BENCH-{files.name.upper()}/"))
    if len(keys) != 3 * expected_clips:
        raise RuntimeError(f"{files.name}: {len(keys)} objects stored, expected {3 * expected_clips}")
    video_key = next(key for key in keys if key.endswith(".mp4"))
    if store.get_bytes(video_key) != files.video.read_bytes():
        raise RuntimeError(f"{video_key}: stored bytes differ from the uploaded file")
    if store.metadata(video_key).get("profile") != PROFILE:
        raise RuntimeError(f"{video_key}: user metadata missing")


def store_version() -> str:
    """``ceph-rgw <version>`` from the installed radosgw."""
    out = subprocess.run(["radosgw", "--version"], capture_output=True, text=True, check=True).stdout
    words = out.split()  # "ceph version 16.2.15 (<sha>) pacific (stable)"
    return f"ceph-rgw {words[2]} ({words[4]})" if len(words) > 4 else f"ceph-rgw {out.strip()}"


def fleet_context(
    payloads: dict[str, ClipFiles], publish_s: dict[str, float], gpus: int, per_gpu_hour: tuple[int, int]
) -> dict:
    """What one sequential uploader publishes per hour against what ``gpus`` GPUs make."""
    low, high = gpus * per_gpu_hour[0], gpus * per_gpu_hour[1]
    context = {"gpus": gpus, "clips_per_gpu_hour": list(per_gpu_hour), "fleet_clips_per_hour": [low, high]}
    for name, files in payloads.items():
        one = 3600 / publish_s[name]
        context[name] = {
            "bytes_per_clip": files.total_bytes,
            "one_uploader_clips_per_hour": round(one),
            "fleet_mb_s_needed": [round(n * files.total_bytes / MB / 3600, 3) for n in (low, high)],
            "headroom_at_fleet_high": round(one / high, 1),
        }
    return context


def markdown(result: dict) -> str:
    concurrency = list(next(iter(result["publish"].values())))
    lines = [
        f"Upload to {result['store']} on {result['device']['cpu']} ({result['device']['cores']} cores, "
        "client and server sharing them); MB = 10^6 bytes",
        "",
        "| clip (video + thumbnail + preview) | bytes per clip | "
        + " | ".join(f"{c} uploader(s): MB/s, clips/s" for c in concurrency)
        + " | publish s per clip (1 uploader) | one uploader clips/h |",
        "|---|---|" + "---|" * len(concurrency) + "---|---|",
    ]
    for name, payload in result["payloads"].items():
        rates = result["publish"][name]
        cells = [f"{rates[c]['mb_s']:.1f}, {rates[c]['clips_s']:.2f}" for c in concurrency]
        lines.append(
            f"| {payload['clip']} | {payload['clip_bytes'] / MB:.2f} MB "
            f"({payload['video_bytes'] / MB:.2f} + {payload['thumbnail_bytes'] / 1e3:.0f} k + "
            f"{payload['preview_bytes'] / 1e3:.0f} k) | {' | '.join(cells)} | "
            f"{result['publish_seconds_per_clip'][name]:.3f} | "
            f"{result['fleet_context'][name]['one_uploader_clips_per_hour']} |"
        )
    big = result["multipart"]
    lines += [
        "",
        f"Multipart: {big['bytes'] / MB:.0f} MB in {big['parts']} parts of "
        f"{big['part_size'] / 2**20:.0f} MiB, {big['parallel_part_uploads']} in parallel: "
        f"**{big['mb_s']:.1f} MB/s** (rounds {big['rounds_mb_s']})",
    ]
    fleet = result["fleet_context"]
    lines.append(
        f"Fleet: {fleet['gpus']} GPUs x {fleet['clips_per_gpu_hour'][0]}-{fleet['clips_per_gpu_hour'][1]} "
        f"clips/h = {fleet['fleet_clips_per_hour'][0]}-{fleet['fleet_clips_per_hour'][1]} clips/h; "
        + "; ".join(
            f"{name}: needs {'-'.join(map(str, fleet[name]['fleet_mb_s_needed']))} MB/s, "
            f"one uploader has {fleet[name]['headroom_at_fleet_high']}x headroom"
            for name in result["payloads"]
        )
    )
    return "\n".join(lines)


def run(
    out_dir: Path,
    repeats: int,
    concurrency: list[int],
    clips_per_uploader: int,
    multipart_mb: int,
    fleet_gpus: int,
    clips_per_gpu_hour: tuple[int, int],
) -> dict:
    began = time.perf_counter()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="wf-upload-") as tmp:
        scratch = Path(tmp)
        s3_port, mon_port = free_ports(2)
        server = CephObjectStore(
            ObjectStoreServerConfig(
                data_dir=scratch / "s3",
                s3_port=s3_port,
                mon_port=mon_port,
                access_key="wanfactory-bench",
                secret_key=secrets.token_urlsafe(24),
            )
        )
        # The cluster's first start is mostly waiting on its daemons: make the payloads meanwhile.
        with ThreadPoolExecutor(max_workers=1) as starter:
            starting = starter.submit(server.start)
            try:
                payloads = {
                    name: make_clip_files(name, scratch / "payloads", os.cpu_count() or 1) for name in CLIPS
                }
                for name, files in payloads.items():
                    print(f"payload {name}: {files.sizes}", flush=True)
            finally:
                starting.result()
        print(f"object store up at {server.endpoint} after {time.perf_counter() - began:.1f} s", flush=True)
        try:
            config = ObjectStoreConfig(
                endpoint=server.endpoint,
                access_key=server.config.access_key,
                secret_key=SecretStr(server.config.secret_key),
                bucket=BUCKET,
            )
            store = ObjectStore(config)
            store.ensure_bucket()
            meter = CpuMeter(server)
            publish, publish_s = {}, {}
            for name, files in payloads.items():
                publish[name], publish_s[name] = measure_publish(
                    config, files, concurrency, repeats, clips_per_uploader, meter
                )
                published = 2 + sum(
                    repeats * c * max(clips_per_uploader, math.ceil(8 / c)) for c in concurrency
                )
                check_published(store, files, published)
            multipart = measure_multipart(store, scratch, multipart_mb, repeats, meter)
            version = store_version()
        finally:
            server.stop()
    result = {
        "date": dt.date.today().isoformat(),
        "device": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "host": platform.node(),
            "load_average_start": round(load_start, 2),
            "load_average_end": round(os.getloadavg()[0], 2),
        },
        "store": version,
        "store_setup": "one node on this machine: ceph-mon, bluestore ceph-osd (sparse file), radosgw beast; "
        "infra/object_store_server.py's config",
        "client": "tasks.publish.publish_clip -> infra.objectstore.ObjectStore.put_file (minio "
        "fput_object + stat_object), one ObjectStore per clip, uploader threads in one process",
        "note": "client and server share the machine's cores; *_cpu_s_per_mb say what each side costs",
        "repeats": repeats,
        "payloads": {
            name: {
                "clip": CLIPS[name][4],
                "crf": DELIVERY_CRF,
                **files.sizes,
                "clip_bytes": files.total_bytes,
                "video_mbit_s": round(files.sizes["video_bytes"] * 8 / (files.frames / files.fps) / 1e6, 2),
                "video_bits_per_pixel": round(
                    files.sizes["video_bytes"] * 8 / (files.width * files.height * files.frames), 3
                ),
                "video_multipart": get_part_info(files.sizes["video_bytes"], 0)[1] > 1,
            }
            for name, files in payloads.items()
        },
        "publish": publish,
        "publish_seconds_per_clip": {name: round(seconds, 4) for name, seconds in publish_s.items()},
        "multipart": multipart,
        "fleet_context": fleet_context(payloads, publish_s, fleet_gpus, clips_per_gpu_hour),
        "wall_s": round(time.perf_counter() - began, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "upload-latest.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    parser.add_argument("--repeats", type=int, default=5, help="rounds per measurement; medians are reported")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="uploader threads")
    parser.add_argument("--clips-per-uploader", type=int, default=2)
    parser.add_argument("--multipart-mb", type=int, default=200)
    parser.add_argument("--fleet-gpus", type=int, default=4)
    parser.add_argument("--clips-per-gpu-hour", type=int, nargs=2, default=[40, 60], metavar=("LOW", "HIGH"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    run(
        args.out,
        args.repeats,
        args.concurrency,
        args.clips_per_uploader,
        args.multipart_mb,
        args.fleet_gpus,
        tuple(args.clips_per_gpu_hour),
    )


if __name__ == "__main__":
    main()
