"""Invisible watermark: a 48-bit clip identifier hidden in the frames' chroma (the first mark).

Profiles now embed the periodic luma mark (:mod:`tasks.postprod.periodic_mark`), which survives
resizes and crops; this one stays to read clips made before it, and ``payload_for`` /
``format_payload`` / :func:`decoded_frames` serve both.

Uses invisible-watermark's ``dwtDctSvd`` method (the one that survives H.264): the U
plane goes through a Haar DWT, and in each block of the approximation band (8x8 there,
16x16 pixels) the largest singular value is quantised to encode one payload bit, the bits
repeating over the blocks in raster order. A 1280x704 frame carries each bit in about 73
blocks and the clip in 121 frames, so reading votes twice: within each frame over the
blocks, then across frames. The vote outlasts the final H.264 encode and a visible overlay
drawn after the mark (which only spoils the blocks under the logo).

The changes to the library are all in :class:`_DwtDctSvd`: its band-order bug is fixed,
its per-block Python loops are replaced by array operations, each block moves to the
nearest quantisation centre instead of the one above, and pixels the mark would push
out of range keep it as a brightness change. Its reader sees the same bits in our frames.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Self

import cv2
import ffmpeg
import numpy as np
import pywt
from pydantic import model_validator

from tasks.postprod.params import stage_params
from tasks.postprod.report import StageReport, cpu_timer

PAYLOAD_BITS = 48
# invisible-watermark refuses frames of fewer pixels than this (its check is on the area).
MIN_PIXELS = 256 * 256
# OpenCV's YUV of float images centres U and V on 0.5 where uint8 images centre them on 128; the
# reader sees uint8 frames, so the embedder adds the difference to land on the same values.
_FLOAT_CHROMA_OFFSET = 127.5
# Power iterations for each block's top singular pair, started from the flat (DC) vector. The U
# plane sits around 128, so a block's top singular value is its DC term and dwarfs the rest
# (s1/s0 < 0.1 in natural frames): three iterations reach float precision. Blocks still off
# after these (strong saturated-colour edges) get an exact SVD.
_POWER_ITERATIONS = 4
_RESIDUAL_TOLERANCE = 1e-4
# Frames whose PSNR the embed report gives, spread over the clip.
_PSNR_SAMPLES = 8


def payload_for(clip_id: str, run_id: str) -> int:
    """The 48-bit watermark payload identifying ``clip_id`` of ``run_id``: the first 48 bits of a SHA-256."""
    digest = hashlib.sha256(f"{run_id}\0{clip_id}".encode()).digest()
    return int.from_bytes(digest[: PAYLOAD_BITS // 8], "big")


@stage_params
class InvisibleWatermarkParams:
    """How the invisible watermark is embedded and read (the reader must use the embedder's values).

    ``enabled``: False passes frames through unmarked.
    ``method``: invisible-watermark's method. Only ``dwtDctSvd`` is offered: ``dwtDct`` does
    not survive H.264 and ``rivaGan`` failed to recover payloads.
    ``scales``: quantisation step of the block's top singular value per YUV plane (Y, U, V);
    0 leaves a plane alone, and the library never marks V. ``block``: the library's block
    size in the approximation band (a block covers twice that in pixels). The defaults,
    U at 128 in 8x8 blocks, cost 39.3 dB PSNR (set by the step, whatever the content) and
    read back exactly after x264 crf 28 with a logo over 15% of the frame. U at 64 in 4x4
    blocks (the same PSNR) reads back with less than half the strength when the camera moves.
    ``frame_stride``: mark (and read) every n-th frame. 1 marks all, which gives the vote the
    most frames; a larger stride saves embedding time but makes the mark flicker at fps/n.
    ``min_strength``: the mean bit strength (see :class:`WatermarkReading`) from which a
    reading counts as a watermark found. Unmarked clips read up to 0.31 at 256x256 (a still
    frame, whose few blocks per bit agree by chance in every frame) and under 0.1 at the
    real sizes; marked ones 0.57 or more after crf 28 with the logo.
    """

    enabled: bool = True
    method: Literal["dwtDctSvd"] = "dwtDctSvd"
    scales: tuple[int, int, int] = (0, 128, 0)
    block: int = 8
    frame_stride: int = 1
    min_strength: float = 0.45

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.method != "dwtDctSvd":
            raise ValueError(f"watermark method {self.method!r}: only 'dwtDctSvd' survives H.264")
        if len(self.scales) != 3 or min(self.scales) < 0 or self.scales[2] or not any(self.scales[:2]):
            raise ValueError(f"watermark scales {self.scales}: need (Y, U, 0) >= 0 with Y or U above 0")
        if self.block < 2:
            raise ValueError(f"watermark block {self.block}: must be at least 2")
        if self.frame_stride < 1:
            raise ValueError(f"watermark frame_stride {self.frame_stride}: must be at least 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The parameters as JSON-ready values, for the stage report."""
        return {**asdict(self), "scales": list(self.scales), "payload_bits": PAYLOAD_BITS}


def format_payload(payload: int) -> str:
    """A payload as the 12 hex digits that reports and manifests show."""
    return f"{payload:0{PAYLOAD_BITS // 4}x}"


@dataclass(frozen=True)
class WatermarkReading:
    """What the vote read from a clip.

    Each read frame votes on each bit with the sign of its mean soft score over that bit's
    blocks (+1 at bit 1's quantisation centre, -1 at bit 0's); ``payload`` is the majority.
    Per bit, ``agreement`` is the fraction of frames that voted with the majority, and
    ``strength`` the mean score in the majority's direction after subtracting each frame's
    mean over all bits (flat colour pushes every bit the same way, a payload does not):
    near 1 for a clean mark, near 0 for unmarked content. ``found`` means the mean strength
    reaches the params' ``min_strength``. ``problem`` says why nothing could be read (then
    ``payload`` is None).
    """

    found: bool
    payload: int | None
    frames_read: int
    agreement: tuple[float, ...] = ()
    strength: tuple[float, ...] = ()
    problem: str | None = None

    @property
    def payload_hex(self) -> str | None:
        """The payload as 12 hex digits, or None."""
        return None if self.payload is None else format_payload(self.payload)

    @property
    def confidence(self) -> float:
        """The weakest bit's agreement across frames (0 when nothing was read)."""
        return min(self.agreement, default=0.0)

    @property
    def mean_strength(self) -> float:
        """The bits' mean strength (0 when nothing was read)."""
        return float(np.mean(self.strength)) if self.strength else 0.0

    def summary(self) -> str:
        """One line for a person: found or not, the payload and how sure."""
        if self.payload is None:
            return f"not read ({self.problem})"
        return (
            f"{'found' if self.found else 'not found'} (dwtDctSvd), payload {self.payload_hex}, confidence"
            f" {self.confidence:.2f}, strength {self.mean_strength:.2f} over {self.frames_read} frames"
        )

    def to_dict(self) -> dict[str, Any]:
        """The reading as JSON-ready values."""
        return {
            "method": "dwtDctSvd",
            "found": self.found,
            "payload_hex": self.payload_hex,
            "frames_read": self.frames_read,
            "confidence": round(self.confidence, 4),
            "mean_strength": round(self.mean_strength, 4),
            "agreement": [round(value, 4) for value in self.agreement],
            "strength": [round(value, 4) for value in self.strength],
            "problem": self.problem,
        }


def watermark_size_problem(
    width: int, height: int, params: InvisibleWatermarkParams = InvisibleWatermarkParams()
) -> str | None:
    """Why frames of ``width`` x ``height`` cannot carry the watermark, or None if they can.

    Meant for planning time, so that a clip too small is refused before it is generated.
    """
    if width * height < MIN_PIXELS:
        return (
            f"{width}x{height} is too small for the invisible watermark: invisible-watermark needs "
            f"at least {MIN_PIXELS:,} pixels per frame (256x256), this has {width * height:,}"
        )
    # As the library: the DWT runs on the frame cut to multiples of 4, then whole blocks.
    blocks = (height // 4 * 2 // params.block) * (width // 4 * 2 // params.block)
    if blocks < PAYLOAD_BITS:
        side = 2 * params.block
        return (
            f"{width}x{height} is too narrow for the invisible watermark: it holds {blocks} blocks of "
            f"{side}x{side} pixels and the {PAYLOAD_BITS}-bit payload needs at least {PAYLOAD_BITS}"
        )
    return None


def _blocks(plane: np.ndarray, size: int) -> np.ndarray:
    """The whole ``size`` x ``size`` blocks of ``plane`` in raster order, as a (blocks, size, size) copy."""
    rows, cols = plane.shape[0] // size, plane.shape[1] // size
    tiles = plane[: rows * size, : cols * size].reshape(rows, size, cols, size)
    return tiles.transpose(0, 2, 1, 3).reshape(-1, size, size).copy()


def _put_blocks(plane: np.ndarray, blocks: np.ndarray) -> None:
    """Write ``blocks`` (from :func:`_blocks`) back into ``plane`` in place."""
    size = blocks.shape[1]
    rows, cols = plane.shape[0] // size, plane.shape[1] // size
    tiles = blocks.reshape(rows, cols, size, size).transpose(0, 2, 1, 3)
    plane[: rows * size, : cols * size] = tiles.reshape(rows * size, cols * size)


def _top_singular(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each block's largest singular value with its left and right singular vectors: (u, s, v)."""
    gram = np.matmul(blocks.transpose(0, 2, 1), blocks)
    flat = 1 / np.sqrt(blocks.shape[1])
    v = np.full(blocks.shape[:2], flat, blocks.dtype)
    for _ in range(_POWER_ITERATIONS):
        nxt = np.matmul(gram, v[:, :, None])[:, :, 0]
        norm = np.linalg.norm(nxt, axis=1, keepdims=True)
        v = np.divide(nxt, norm, out=v, where=norm > 0)  # an all-zero block keeps the flat vector
    bv = np.matmul(blocks, v[:, :, None])[:, :, 0]
    s = np.linalg.norm(bv, axis=1)
    residual = np.linalg.norm(np.matmul(gram, v[:, :, None])[:, :, 0] - (s * s)[:, None] * v, axis=1)
    slow = np.flatnonzero(residual > _RESIDUAL_TOLERANCE * np.maximum(s * s, 1))
    u = np.divide(bv, s[:, None], out=np.full_like(bv, flat), where=s[:, None] > 0)
    if slow.size:
        u_exact, s_exact, vt_exact = np.linalg.svd(blocks[slow])
        u[slow], s[slow], v[slow] = u_exact[:, :, 0], s_exact[:, 0], vt_exact[:, 0, :]
    return u, s, v


def _soft_scores(s: np.ndarray, scale: int) -> np.ndarray:
    """Soft bit per block from its top singular value: +1 at bit 1's centre, -1 at bit 0's, 0 between.

    The library reads a bit as ``(s % scale) > scale / 2``, the sign of this score. The
    magnitude lets blocks the mark could not reach (clipped whites, the logo) abstain
    rather than vote for 0.
    """
    return -np.sin(2 * np.pi * np.mod(s, scale) / scale)


def _back_in_range(bgr: np.ndarray) -> None:
    """Move pixels that left [0, 255] back along grey, in place.

    Where the mark pushes a channel past 0 or 255 (white and black backdrops), clipping would
    undo it. Adding (t, t, t) leaves U and V as they are, so the mark survives as a slight
    change of brightness there instead.
    """
    if bgr.max() <= 255 and bgr.min() >= 0:
        return
    # Channel by channel: numpy's max over a last axis of 3 is several times slower.
    blue, green, red = bgr[..., 0], bgr[..., 1], bgr[..., 2]
    high = np.maximum(np.maximum(blue, green), red)
    low = np.minimum(np.minimum(blue, green), red)
    bgr += (np.maximum(-low, 0) - np.maximum(high - 255, 0))[..., None]


class _DwtDctSvd:
    """invisible-watermark 0.2.0's ``dwtDctSvd`` embedder with its band-order bug fixed, vectorised.

    Its attributes and bit layout are the library's, so the library's own decoder reads our marks
    (tests/test_invisible_watermark.py checks it). Not a subclass: every method is replaced, and
    importing the library imports torch (for its rivaGan method), which post-production never needs.
    """

    def __init__(self, watermarks: list[int], payload_bits: int, scales: list[int], block: int) -> None:
        self._watermarks, self._wmLen, self._scales, self._block = watermarks, payload_bits, scales, block

    def encode(self, bgr: np.ndarray) -> np.ndarray:
        """Mark one BGR uint8 frame (the library's contract), returning a new one."""
        rows, cols = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
        # Float where the library converts to uint8 YUV and truncates (wrapping below 0) on the
        # way back: that rounds Y and V twice although only the marked plane should change.
        yuv = cv2.cvtColor(bgr.astype(np.float32), cv2.COLOR_BGR2YUV)
        for channel in range(2):  # as in the library: Y and U only
            if self._scales[channel] <= 0:
                continue
            offset = _FLOAT_CHROMA_OFFSET if channel else 0.0
            # A contiguous copy: pywt is several times slower on a strided channel view.
            plane = yuv[:rows, :cols, channel] + offset
            ca, (h, v, d) = pywt.dwt2(plane, "haar")
            self.encode_frame(ca, self._scales[channel])
            # The fix. The library passes (v, h, d) to idwt2, which expects (h, v, d): that swaps
            # the plane's horizontal and vertical detail, up to 18 dB of PSNR on detailed frames.
            # The mark lives in the approximation band, which the swap leaves alone, so reading
            # still worked and the bug went unnoticed.
            yuv[:rows, :cols, channel] = pywt.idwt2((ca, (h, v, d)), "haar") - offset
        marked = cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)
        _back_in_range(marked)
        return np.clip(np.rint(marked, out=marked), 0, 255, out=marked).astype(np.uint8)

    def encode_frame(self, frame: np.ndarray, scale: int) -> None:
        """The library's per-block loop on all blocks of ``frame`` at once, in place.

        The library quantises the top singular value s0 of the block's DCT. The orthonormal
        DCT keeps singular values and maps singular vectors, so changing s0 there equals
        adding (s0' - s0) u0 v0^T to the block itself, with the block's own top singular
        vectors: no DCT needed.
        """
        blocks = _blocks(frame, self._block)
        u, s, v = _top_singular(blocks)
        bits = np.resize(np.asarray(self._watermarks, dtype=blocks.dtype), len(blocks))
        # The same centres as the library (a quarter or three quarters into each step, so its
        # reader sees the same bits), but the nearest one: the library floors to the step and
        # moves s0 by up to 3/4 of it (RMS 0.38 step); the nearest centre is at most half a step
        # away (RMS 0.29), 2.4 dB of PSNR. An s0 cannot go negative, so those go one step up.
        centre = (0.25 + 0.5 * bits) * scale
        target = np.rint((s - centre) / scale) * scale + centre
        target = np.where(target < 0, target + scale, target)
        blocks += (target - s)[:, None, None] * u[:, :, None] * v[:, None, :]
        _put_blocks(frame, blocks)

    def bit_scores(self, bgr: np.ndarray) -> np.ndarray:
        """Mean soft score (see :func:`_soft_scores`) per payload bit over one BGR uint8 frame's blocks.

        Reads the planes as the library's ``decode`` does (uint8 YUV, Haar approximation band).
        """
        rows, cols = bgr.shape[0] // 4 * 4, bgr.shape[1] // 4 * 4
        yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)
        sums, counts = np.zeros(self._wmLen), np.zeros(self._wmLen)
        for channel in range(2):
            if self._scales[channel] <= 0:
                continue
            ca, _ = pywt.dwt2(yuv[:rows, :cols, channel].astype(np.float32), "haar")
            _, s, _ = _top_singular(_blocks(ca, self._block))
            bit_of_block = np.arange(len(s)) % self._wmLen
            sums += np.bincount(bit_of_block, _soft_scores(s, self._scales[channel]), self._wmLen)
            counts += np.bincount(bit_of_block, minlength=self._wmLen)
        return sums / counts


def _embedder(params: InvisibleWatermarkParams, payload: int = 0) -> _DwtDctSvd:
    bits = [(payload >> (PAYLOAD_BITS - 1 - i)) & 1 for i in range(PAYLOAD_BITS)]  # MSB first, as the library
    return _DwtDctSvd(
        watermarks=bits, payload_bits=PAYLOAD_BITS, scales=list(params.scales), block=params.block
    )


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def embed_watermark(
    frames: np.ndarray, payload: int, params: InvisibleWatermarkParams = InvisibleWatermarkParams()
) -> tuple[np.ndarray, StageReport]:
    """Hide ``payload`` (48 bits, see :func:`payload_for`) in uint8 RGB ``frames`` (n, h, w, 3).

    Returns the marked frames (a new array; the input is returned untouched when the stage
    is off or the frames are too small, with the reason in the report) and the stage report.
    """
    if not 0 <= payload < 1 << PAYLOAD_BITS:
        raise ValueError(f"watermark payload {payload} does not fit in {PAYLOAD_BITS} bits")
    report = StageReport("invisible_watermark", applied=False, params=params.to_dict())
    with cpu_timer(report):
        if not params.enabled:
            report.outcome = {"skipped": "disabled"}
            return frames, report
        if problem := watermark_size_problem(frames.shape[2], frames.shape[1], params):
            report.outcome = {"skipped": problem}
            return frames, report
        embedder = _embedder(params, payload)
        # Frames left unmarked by the stride are copied; marked ones are written whole below.
        marked = frames.copy() if params.frame_stride > 1 else np.empty_like(frames)
        targets = range(0, len(frames), params.frame_stride)
        for index in targets:
            bgr = cv2.cvtColor(frames[index], cv2.COLOR_RGB2BGR)
            marked[index] = cv2.cvtColor(embedder.encode(bgr), cv2.COLOR_BGR2RGB)
        sampled = targets[:: max(1, len(targets) // _PSNR_SAMPLES)]
        report.applied = True
        report.outcome = {
            "payload_hex": format_payload(payload),
            "frames_marked": len(targets),
            "min_psnr_db": round(min(_psnr(frames[i], marked[i]) for i in sampled), 2),
        }
    return marked, report


def _vote(scores: list[np.ndarray], params: InvisibleWatermarkParams) -> WatermarkReading:
    per_frame = np.stack(scores)  # (frames, bits)
    votes = (per_frame > 0).mean(axis=0)
    # A tied vote goes to the summed soft scores.
    bits = np.where(votes == 0.5, per_frame.sum(axis=0) > 0, votes > 0.5)
    agreement = np.where(bits, votes, 1 - votes)
    centred = per_frame - per_frame.mean(axis=1, keepdims=True)
    strength = (centred * np.where(bits, 1.0, -1.0)).mean(axis=0)
    return WatermarkReading(
        found=bool(strength.mean() >= params.min_strength),
        payload=int("".join(str(int(bit)) for bit in bits), 2),
        frames_read=len(scores),
        agreement=tuple(float(value) for value in agreement),
        strength=tuple(float(value) for value in strength),
    )


def _read(frames: Iterable[np.ndarray], params: InvisibleWatermarkParams) -> WatermarkReading:
    reader = _embedder(params)
    scores = []
    for index, frame in enumerate(frames):
        if index == 0 and (problem := watermark_size_problem(frame.shape[1], frame.shape[0], params)):
            return WatermarkReading(found=False, payload=None, frames_read=0, problem=problem)
        if index % params.frame_stride == 0:
            scores.append(reader.bit_scores(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)))
    if not scores:
        return WatermarkReading(found=False, payload=None, frames_read=0, problem="no frames to read")
    return _vote(scores, params)


def extract_watermark(
    frames: np.ndarray, params: InvisibleWatermarkParams = InvisibleWatermarkParams()
) -> WatermarkReading:
    """Read the payload from uint8 RGB ``frames`` (n, h, w, 3) by majority vote; never raises on content."""
    return _read(frames, params)


class DecodeFailed(Exception):
    """ffmpeg could not decode a video (the message says why)."""


def decoded_frames(path: Path) -> Iterator[np.ndarray]:
    """``path``'s video frames as uint8 RGB, one at a time (a whole 1280x704 clip is 327 MB).

    Raises :class:`DecodeFailed` with ffmpeg's reason when the file cannot be decoded.
    """
    try:
        stream = ffmpeg.probe(str(path), select_streams="v:0")["streams"][0]
    except (ffmpeg.Error, IndexError) as err:
        raise DecodeFailed(f"no video stream ffprobe can read in {path}") from err
    width, height = int(stream["width"]), int(stream["height"])
    args = ffmpeg.input(str(path)).output("pipe:", format="rawvideo", pix_fmt="rgb24").compile()
    args[1:1] = ["-hide_banner", "-nostats", "-loglevel", "error"]
    # The log goes to a file, not a pipe: a damaged stream can log more than a pipe holds
    # while we are still reading frames, and ffmpeg would block.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log)
        frame_bytes, completed = width * height * 3, False
        try:
            while len(chunk := proc.stdout.read(frame_bytes)) == frame_bytes:
                yield np.frombuffer(chunk, np.uint8).reshape(height, width, 3)
            completed = True
        finally:
            proc.stdout.close()
            if not completed:  # the reader stopped early (or failed): ffmpeg's output is not wanted
                proc.kill()
            proc.wait()
        if proc.returncode != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-600:]
            raise DecodeFailed(f"ffmpeg could not decode {path} (exit {proc.returncode}): {tail}")


def read_watermark_file(
    path: Path | str, params: InvisibleWatermarkParams = InvisibleWatermarkParams()
) -> WatermarkReading:
    """Decode the video at ``path`` with ffmpeg and read its watermark.

    Never raises on a bad file: one ffmpeg cannot decode gives a reading with a ``problem``.
    """
    try:
        return _read(decoded_frames(Path(path)), params)
    except DecodeFailed as err:
        return WatermarkReading(found=False, payload=None, frames_read=0, problem=str(err))
