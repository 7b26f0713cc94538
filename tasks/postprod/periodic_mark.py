"""The invisible watermark that survives what platforms do to a clip: a periodic luma pattern.

Technique: a tiled (periodic) spread-spectrum watermark with a synchronisation template, read
after folding the frame onto the tile period. The lineage is the periodic / self-referencing
watermark (Kutter; Deguillaume, Voloshynovskiy and Pun, "Method for the estimation and recovering
of general affine transform", US 6,904,151: a periodic mark whose regular structure lets the
reader estimate the geometric transform) and Alattar and Meyer's tiled watermarks, where the
repetition of the tiles is itself the synchronisation template. What we take from them, and why:

* **The same tile everywhere, the same pattern in every frame.** Frame-rate changes, frame
  blending and excerpts then cost nothing (any frame carries the whole mark), and the reader
  averages all frames: the mark adds up coherently while moving content averages away.
* **Crops are a phase shift.** Folding the frame modulo the tile period (summing all tile-sized
  pieces) gives one tile whatever was cut off; the offset is found by FFT cross-correlation of the
  folded tile with a known synchronisation pattern (the template), as in the tiled schemes above.
* **Resizes are a search.** Platforms resize without rotating, so instead of a log-polar
  transform the reader tries scales from 0.4 to 1.6 (coarse on the frame's centre, then fine on the
  whole frame) and keeps the one whose template peak stands out most.
* **Low frequencies of luma.** The pattern is band-limited to chips of 8 px (at most 1/16 cycle
  per pixel): it keeps most of its energy through a halving and x264 at crf 30, and luma, unlike
  chroma, is not subsampled by yuv420p. Before folding the reader whitens the frame (each pixel's
  high-pass over its local contrast, then a radial whitening of the folded tile), which turns the
  correlation into a matched filter in the image's own noise.
* **The payload is coded.** The 48-bit payload plus a CRC-16 is convolutionally coded (K=7, rate
  1/3, soft Viterbi) and spread over the tile's 576 chips; at the margins this recovers words
  that a repetition code of the same length loses, and the CRC catches a wrong decoding.
* **Perceptual masking.** Each pixel's strength follows its local contrast, between a floor for
  flat regions (where a pattern would show) and a cap for texture, and each frame's mark is held
  to a PSNR floor.

Detection states how sure it is: ``z`` is the template peak's height in standard deviations of
its null distribution, maximised over every scale and phase tried. Its null distribution (no
mark) was measured on 1,470 unmarked clips by ``bench/watermark_null.py`` and fitted with a
Gumbel law (maxima of many correlations). A reading's false-positive probability is the fitted
tail at its ``z`` times 2^-16 when the decoded word passes its CRC (a word decoded from noise
passes one time in 65,536); the mark is *found* when that is at most 1e-6.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Self

import cv2
import numpy as np
from pydantic import model_validator

from tasks.postprod.invisible import PAYLOAD_BITS, DecodeFailed, decoded_frames, format_payload
from tasks.postprod.params import stage_params
from tasks.postprod.report import StageReport, cpu_timer

METHOD = "periodic-luma-v1"
# The tile: 24 x 24 chips of 8 px, repeating every 192 px of the marked frame.
CHIPS = 24
CHIP_PX = 8
TILE_PX = CHIPS * CHIP_PX
CRC_BITS = 16
# The convolutional code (K=7, rate 1/3: the generators of the 3GPP / IS-95 family).
_CONSTRAINT = 7
_GENERATORS = (0o133, 0o171, 0o165)
_STATES = 1 << (_CONSTRAINT - 1)
_INFO_BITS = PAYLOAD_BITS + CRC_BITS
_CODED_BITS = (_INFO_BITS + _CONSTRAINT - 1) * len(_GENERATORS)
# Share of the mark's power in the synchronisation template (the rest carries the payload): the
# template is one pattern over all 576 chips, while each coded bit has under 3, so it needs less.
_SYNC_SHARE = 0.25
# The pattern's key: fixed, so every reader finds every clip's mark.
_KEY = b"wanfactory periodic luma mark v1"
# The scales the reader tries (observed size / marked size): platforms serve from 0.4x (1280 -> 512)
# up to 1.6x (832 -> 1280). Coarse steps of 1.5 %, on the central 3 x 3 tiles where a 1.5 % error
# shifts the fold by at most 4 px; then steps of 0.25 % around the best three on the whole frame.
_SCALE_RANGE = (0.4, 1.6)
_COARSE_STEP = 0.015
_FINE_STEPS = np.arange(-7, 8) * 0.0025
_COARSE_WINDOW_TILES = 3
_CANDIDATES = 3
# The reader's whitening: each frame's high-pass (minus a Gaussian blur of this sigma, in observed
# pixels) over its local contrast plus a constant (grey levels), so edges do not drown the mark.
_READ_HIGHPASS_SIGMA = 3.0
_READ_CONTRAST_FLOOR = 1.0

# The null distribution of ``z`` (no mark), fitted by bench/watermark_null.py on 1,470 unmarked
# clips: Gumbel location and scale from bench/results/2026-12-07/watermark-null.json (the fit's
# tail lies above the measured one from its 90th percentile on: conservative). A false positive
# needs z at the threshold *and* a passing CRC (2^-16 for a word decoded from noise), so the
# threshold is where the fitted tail is MAX_FALSE_POSITIVE / 2^-16 = 0.066: z 5.23, inside the
# measured range (no extrapolation). A mark is usually far above it (z 7 to 12 after the
# transforms of bench/watermark_robustness.py); z alone would need 10.1 for 1e-6 (extrapolated).
NULL_GUMBEL_LOC = 4.0568
NULL_GUMBEL_SCALE = 0.4365
CRC_FALSE_PASS = 2.0**-CRC_BITS
MAX_FALSE_POSITIVE = 1e-6
NULL_TAIL_AT_THRESHOLD = MAX_FALSE_POSITIVE / CRC_FALSE_PASS


def z_threshold() -> float:
    """The decision threshold on ``z``: where the fitted null's tail falls to ``NULL_TAIL_AT_THRESHOLD``."""
    return NULL_GUMBEL_LOC - NULL_GUMBEL_SCALE * float(np.log(-np.log1p(-NULL_TAIL_AT_THRESHOLD)))


def null_tail(z: float) -> float:
    """P(z' >= z) for an unmarked clip, from the fitted Gumbel law."""
    return float(-np.expm1(-np.exp(-(z - NULL_GUMBEL_LOC) / NULL_GUMBEL_SCALE)))


@stage_params
class PeriodicMarkParams:
    """How strongly the periodic watermark is embedded (the reader needs none of these).

    ``enabled``: False passes frames through unmarked.
    ``strength``: the pattern's RMS amplitude in grey levels where the local contrast is
    ``contrast_ref``; a pixel's amplitude is ``strength`` times its contrast over ``contrast_ref``,
    held between ``flat_gain`` and ``texture_gain``. ``flat_gain`` 0.15 keeps the mark within one
    grey level on flat regions (tests/test_periodic_mark.py checks a gradient).
    ``min_psnr_db``: no frame's mark is stronger than this PSNR allows (its amplitude is scaled down).
    """

    enabled: bool = True
    strength: float = 2.6
    contrast_ref: float = 8.0
    flat_gain: float = 0.15
    texture_gain: float = 1.3
    min_psnr_db: float = 38.5

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.strength <= 0 or self.contrast_ref <= 0:
            raise ValueError(
                f"watermark strength {self.strength} and contrast_ref {self.contrast_ref} must be above 0"
            )
        if not 0 <= self.flat_gain <= self.texture_gain:
            raise ValueError(
                f"watermark gains: need 0 <= flat_gain ({self.flat_gain})"
                f" <= texture_gain ({self.texture_gain})"
            )
        if self.min_psnr_db < 30:
            raise ValueError(f"watermark min_psnr_db {self.min_psnr_db}: below 30 dB the mark is visible")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The parameters as JSON-ready values, for the stage report."""
        return {**asdict(self), "method": METHOD, "payload_bits": PAYLOAD_BITS, "tile_px": TILE_PX}


def periodic_size_problem(width: int, height: int) -> str | None:
    """Why frames of ``width`` x ``height`` cannot carry the periodic watermark, or None if they can."""
    if min(width, height) < TILE_PX:
        return (
            f"{width}x{height} is too small for the invisible watermark: it repeats a tile of "
            f"{TILE_PX}x{TILE_PX} pixels and needs at least one whole tile"
        )
    return None


# ---- the code: CRC-16, convolutional code, Viterbi


def _crc16(payload: int) -> int:
    """CRC-16/CCITT-FALSE of the payload's 6 bytes."""
    crc = 0xFFFF
    for byte in payload.to_bytes(PAYLOAD_BITS // 8, "big"):
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


@cache
def _trellis() -> tuple[np.ndarray, np.ndarray]:
    """Each (state, input bit)'s next state and its coded symbols as +-1: (states, 2) and (states, 2, 3)."""
    states = np.arange(_STATES)[:, None]
    register = (np.array([0, 1])[None, :] << (_CONSTRAINT - 1)) | states
    symbols = np.stack(
        [np.vectorize(lambda r, g=g: bin(r & g).count("1") & 1)(register) for g in _GENERATORS], axis=-1
    )
    return register >> 1, 2.0 * symbols - 1


def _encode(word: int) -> np.ndarray:
    """The coded bits (0/1) of the 64-bit ``word`` (payload and CRC), MSB first, with a zero tail."""
    next_state, symbols = _trellis()
    bits = [(word >> (_INFO_BITS - 1 - i)) & 1 for i in range(_INFO_BITS)] + [0] * (_CONSTRAINT - 1)
    state, coded = 0, []
    for bit in bits:
        coded.append(symbols[state, bit] > 0)
        state = next_state[state, bit]
    return np.concatenate(coded).astype(np.float64)


def _viterbi(soft: np.ndarray) -> int:
    """The most likely 64-bit word for soft coded values (positive: a 1 is likelier)."""
    _, symbols = _trellis()
    steps = _INFO_BITS + _CONSTRAINT - 1
    soft = soft.reshape(steps, len(_GENERATORS))
    metric = np.full(_STATES, -np.inf)
    metric[0] = 0.0
    # Each state is entered from two states, both with the same input bit (the register's top bit).
    entering_bit = np.arange(_STATES) >> (_CONSTRAINT - 2)
    low, high = (np.arange(_STATES) << 1) % _STATES, ((np.arange(_STATES) << 1) % _STATES) | 1
    from_state = np.zeros((steps, _STATES), np.int64)
    for step in range(steps):
        gain = symbols @ soft[step]  # (states, 2)
        candidates = np.stack(
            [metric[low] + gain[low, entering_bit], metric[high] + gain[high, entering_bit]]
        )
        if step >= _INFO_BITS:  # the tail is all zeros
            candidates[:, entering_bit == 1] = -np.inf
        pick = np.argmax(candidates, axis=0)
        from_state[step] = np.where(pick, high, low)
        metric = candidates[pick, np.arange(_STATES)]
    state, word_bits = 0, []
    for step in range(steps - 1, -1, -1):
        word_bits.append(state >> (_CONSTRAINT - 2))
        state = from_state[step, state]
    bits = word_bits[::-1][:_INFO_BITS]
    return int("".join(map(str, bits)), 2)


# ---- the pattern


@dataclass(frozen=True)
class _Pattern:
    """The key's chips, where each payload chip goes, and the template as the reader correlates it."""

    sync: np.ndarray  # (CHIPS, CHIPS) of +-1
    spread: np.ndarray  # (CHIPS, CHIPS) of +-1: each payload chip's sign
    coded_bit: np.ndarray  # (CHIPS, CHIPS): the coded bit each chip carries
    sync_spectrum: np.ndarray  # FFT of the template tile, (TILE_PX, TILE_PX), without its mean
    null_std: float  # the correlation's standard deviation at any phase for white, unit-power input
    ring: np.ndarray  # each frequency's radius in cycles per tile, for the whitening
    ring_count: np.ndarray


@cache
def _pattern() -> _Pattern:
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(_KEY).digest()[:8], "big"))
    sync = rng.choice([-1.0, 1.0], (CHIPS, CHIPS))
    spread = rng.choice([-1.0, 1.0], (CHIPS, CHIPS))
    # A permutation, so each coded bit's chips are scattered over the tile: a logo or a cropped
    # edge spoils a few chips of many bits, which the code absorbs, not all chips of a few.
    coded_bit = (rng.permutation(CHIPS * CHIPS) % _CODED_BITS).reshape(CHIPS, CHIPS)
    frequency = np.rint(np.fft.fftfreq(TILE_PX) * TILE_PX)
    ring = np.rint(np.hypot(frequency[:, None], frequency[None, :])).astype(np.int64)
    sync_spectrum = np.fft.fft2(_chips_to_tile(sync))
    sync_spectrum[0, 0] = 0
    return _Pattern(
        sync=sync,
        spread=spread,
        coded_bit=coded_bit,
        sync_spectrum=sync_spectrum,
        null_std=float(np.sqrt(np.sum(np.abs(sync_spectrum) ** 2))) / TILE_PX**2,
        ring=ring,
        ring_count=np.bincount(ring.ravel()),
    )


def _chips_to_tile(chips: np.ndarray) -> np.ndarray:
    """Chips as a smooth periodic tile: their spectrum zero-padded to the tile (band-limited)."""
    spectrum = np.fft.fftshift(np.fft.fft2(chips))
    padded = np.zeros((TILE_PX, TILE_PX), complex)
    start = (TILE_PX - CHIPS) // 2
    padded[start : start + CHIPS, start : start + CHIPS] = spectrum
    return np.real(np.fft.ifft2(np.fft.ifftshift(padded))) * (TILE_PX / CHIPS) ** 2


def _tile_to_chips(spectrum: np.ndarray) -> np.ndarray:
    """The adjoint of :func:`_chips_to_tile` on a tile's spectrum: its chip-band part as chip values."""
    start = (TILE_PX - CHIPS) // 2
    band = np.fft.fftshift(spectrum)[start : start + CHIPS, start : start + CHIPS]
    return np.real(np.fft.ifft2(np.fft.ifftshift(band)))


def _tile_for(payload: int) -> np.ndarray:
    """The marked tile for ``payload``, at unit RMS."""
    pattern = _pattern()
    word = (payload << CRC_BITS) | _crc16(payload)
    coded = 2 * _encode(word) - 1
    chips = (
        np.sqrt(_SYNC_SHARE) * pattern.sync
        + np.sqrt(1 - _SYNC_SHARE) * pattern.spread * coded[pattern.coded_bit]
    )
    tile = _chips_to_tile(chips)
    return tile / tile.std()


# ---- embedding


def _gain(frame: np.ndarray, params: PeriodicMarkParams) -> np.ndarray:
    """Each pixel's share of ``strength``: its local contrast over ``contrast_ref``, within the gains.

    Measured on a quarter-size luma (the mask needs no finer detail and costs a sixteenth).
    """
    height, width = frame.shape[:2]
    luma = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(luma, (width // 4, height // 4), interpolation=cv2.INTER_AREA).astype(np.float32)
    detail = small - cv2.GaussianBlur(small, (0, 0), CHIP_PX / 4)
    contrast = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), CHIP_PX / 2))
    gain = np.clip(contrast / params.contrast_ref, params.flat_gain, params.texture_gain)
    return cv2.resize(gain, (width, height), interpolation=cv2.INTER_LINEAR)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def embed_periodic_mark(
    frames: np.ndarray, payload: int, params: PeriodicMarkParams | None = None
) -> tuple[np.ndarray, StageReport]:
    """Hide ``payload`` (48 bits, see :func:`~tasks.postprod.invisible.payload_for`) in uint8 RGB ``frames``.

    ``frames`` is (n, h, w, 3). The mark changes luma only (the same amount on R, G and B).
    Returns the marked frames (a new array; the input itself when the stage is off or the
    frames are too small, with the reason in the report) and the stage report.
    """
    params = params or PeriodicMarkParams()
    if not 0 <= payload < 1 << PAYLOAD_BITS:
        raise ValueError(f"watermark payload {payload} does not fit in {PAYLOAD_BITS} bits")
    report = StageReport("invisible_watermark", applied=False, params=params.to_dict())
    with cpu_timer(report):
        if not params.enabled:
            report.outcome = {"skipped": "disabled"}
            return frames, report
        _, height, width, _ = frames.shape
        if problem := periodic_size_problem(width, height):
            report.outcome = {"skipped": problem}
            return frames, report
        reps = (-(-height // TILE_PX), -(-width // TILE_PX))
        layout = (np.tile(_tile_for(payload), reps)[:height, :width] * params.strength).astype(np.float32)
        # Rounding to integers adds its own 1/12 grey level^2 of error on top of the mark's.
        max_rms = float(np.sqrt((255.0 / 10 ** (params.min_psnr_db / 20)) ** 2 - 1 / 12))
        marked = np.empty_like(frames)
        for index, frame in enumerate(frames):
            delta = layout * _gain(frame, params)
            rms = float(np.sqrt(np.mean(np.square(delta))))
            if rms > max_rms:
                delta *= max_rms / rms
            # The frame is integer, so rounding the change rounds the marked frame.
            step = np.rint(delta).astype(np.int16)[..., None]
            marked[index] = np.clip(frame.astype(np.int16) + step, 0, 255)
        sampled = range(0, len(frames), max(1, len(frames) // 8))
        report.applied = True
        report.outcome = {
            "payload_hex": format_payload(payload),
            "method": METHOD,
            "frames_marked": len(frames),
            "min_psnr_db": round(min(_psnr(frames[i], marked[i]) for i in sampled), 2),
        }
    return marked, report


# ---- reading


@dataclass(frozen=True)
class PeriodicReading:
    """What the reader found in a clip.

    ``z``: the template's correlation peak in standard deviations of its null distribution, the
    largest over all scales and tile phases tried (1,470 unmarked clips: median 4.2, largest 6.3,
    see ``bench/watermark_null.py``). ``scale``: the clip's size over the marked size, as found.
    ``crc_ok``: the decoded word's CRC matches. ``found``: ``z`` reaches the threshold and the
    CRC matches (together: a false-positive probability of at most 1e-6). ``payload`` is the
    decoded payload whether found or not (None when nothing
    could be read, then ``problem`` says why).
    """

    found: bool
    payload: int | None
    frames_read: int
    z: float = 0.0
    scale: float = 0.0
    crc_ok: bool = False
    problem: str | None = None

    method = METHOD

    @property
    def payload_hex(self) -> str | None:
        """The payload as 12 hex digits, or None."""
        return None if self.payload is None else format_payload(self.payload)

    @property
    def false_positive_probability(self) -> float:
        """How likely an unmarked clip reads so: the null tail at ``z``, times 2^-16 if the CRC passed."""
        if self.payload is None:
            return 1.0
        return null_tail(self.z) * (CRC_FALSE_PASS if self.crc_ok else 1.0)

    def summary(self) -> str:
        """One line for a person: found or not, the payload and how sure."""
        if self.payload is None:
            return f"not read ({self.problem})"
        odds = f"false-positive probability {self.false_positive_probability:.1e}"
        evidence = f"z {self.z:.2f} (threshold {z_threshold():.2f}), CRC {'ok' if self.crc_ok else 'failed'}"
        if not self.found:  # the decoded word is noise then: no payload to show
            return f"not found ({METHOD}): {evidence}, {self.frames_read} frames"
        return (
            f"found ({METHOD}), payload {self.payload_hex}, {evidence}, {odds},"
            f" scale {self.scale:.3f}, {self.frames_read} frames"
        )

    def to_dict(self) -> dict[str, Any]:
        """The reading as JSON-ready values."""
        return {
            "method": METHOD,
            "found": self.found,
            "payload_hex": self.payload_hex,
            "frames_read": self.frames_read,
            "z": round(self.z, 3),
            "z_threshold": round(z_threshold(), 3),
            "crc_ok": self.crc_ok,
            "false_positive_probability": self.false_positive_probability,
            "scale": round(self.scale, 4),
            "problem": self.problem,
        }


def _whitened_luma(frame: np.ndarray) -> np.ndarray:
    luma = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    detail = luma - cv2.GaussianBlur(luma, (0, 0), _READ_HIGHPASS_SIGMA)
    contrast = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), 2 * _READ_HIGHPASS_SIGMA))
    return detail / (contrast + _READ_CONTRAST_FLOOR)


def _fold(image: np.ndarray) -> np.ndarray:
    """The mean of ``image`` over its tile-sized pieces: one tile whose phase is the crop's offset."""
    height, width = image.shape
    rows, cols = -(-height // TILE_PX), -(-width // TILE_PX)
    sums = np.zeros((rows * TILE_PX, cols * TILE_PX), np.float32)
    counts = np.zeros_like(sums)
    sums[:height, :width], counts[:height, :width] = image, 1
    shape = (rows, TILE_PX, cols, TILE_PX)
    return sums.reshape(shape).sum(axis=(0, 2)) / np.maximum(counts.reshape(shape).sum(axis=(0, 2)), 1)


def _at_scale(
    image: np.ndarray, scale: float, window: int | None = None
) -> tuple[float, tuple[int, int], np.ndarray]:
    """``image`` brought to the marked size assuming ``scale``, folded and correlated with the template.

    Returns ``z``, the peak's (row, column) phase and the folded tile's whitened spectrum.
    ``window`` (marked pixels) folds only a central square of the image, for the coarse search.
    """
    pattern = _pattern()
    height, width = image.shape
    if window is not None:
        rows, cols = min(height, round(window * scale)), min(width, round(window * scale))
        top, left = (height - rows) // 2, (width - cols) // 2
        image = image[top : top + rows, left : left + cols]
        height, width = image.shape
    size = (max(1, round(width / scale)), max(1, round(height / scale)))
    spectrum = np.fft.fft2(_fold(cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)))
    ring_power = np.bincount(pattern.ring.ravel(), np.abs(spectrum).ravel() ** 2) / pattern.ring_count
    whitened = spectrum / np.sqrt(ring_power[pattern.ring] + 1e-12)
    surface = np.real(np.fft.ifft2(whitened * np.conj(pattern.sync_spectrum)))
    peak = int(np.argmax(surface))
    # Over the null's standard deviation, not the surface's: a strong mark's own sidelobes would
    # inflate the latter, so z would stop growing with the mark and could not rank scales.
    z = float(surface.flat[peak] / pattern.null_std)
    row, col = np.unravel_index(peak, surface.shape)
    return z, (int(row), int(col)), whitened


def _decode_at(whitened: np.ndarray, phase: tuple[int, int]) -> tuple[int, bool]:
    """The payload read from a folded tile's whitened spectrum at ``phase``, and whether its CRC matched."""
    pattern = _pattern()
    frequency = np.fft.fftfreq(TILE_PX)
    shift = np.exp(2j * np.pi * (frequency[:, None] * phase[0] + frequency[None, :] * phase[1]))
    chips = _tile_to_chips(whitened * shift) * pattern.spread
    soft = np.bincount(pattern.coded_bit.ravel(), chips.ravel(), _CODED_BITS)
    word = _viterbi(soft)
    payload = word >> CRC_BITS
    return payload, _crc16(payload) == word & ((1 << CRC_BITS) - 1)


def detect(mean_whitened: np.ndarray, frames_read: int) -> PeriodicReading:
    """Search scales and phases of a clip's mean whitened luma (see :func:`read_periodic_mark`)."""
    coarse = np.exp(np.arange(np.log(_SCALE_RANGE[0]), np.log(_SCALE_RANGE[1]), _COARSE_STEP))
    window = _COARSE_WINDOW_TILES * TILE_PX
    ranked = sorted(((_at_scale(mean_whitened, s, window)[0], s) for s in coarse), reverse=True)
    best: tuple[float, float, tuple[int, int], np.ndarray] | None = None
    for _, centre in ranked[:_CANDIDATES]:
        for scale in centre * np.exp(_FINE_STEPS):
            z, phase, whitened = _at_scale(mean_whitened, float(scale))
            if best is None or z > best[0]:
                best = (z, float(scale), phase, whitened)
    assert best is not None  # the coarse grid is never empty
    z, scale, phase, whitened = best
    payload, crc_ok = _decode_at(whitened, phase)
    return PeriodicReading(
        found=z >= z_threshold() and crc_ok,
        payload=payload,
        frames_read=frames_read,
        z=z,
        scale=scale,
        crc_ok=crc_ok,
    )


def read_periodic_mark(frames: Iterable[np.ndarray]) -> PeriodicReading:
    """Read the mark from uint8 RGB frames (any size, rate or count); never raises on content."""
    total, count = None, 0
    for frame in frames:
        if count == 0 and min(frame.shape[:2]) * _SCALE_RANGE[1] < CHIP_PX * 4:
            return PeriodicReading(
                found=False,
                payload=None,
                frames_read=0,
                problem=f"{frame.shape[1]}x{frame.shape[0]} is too small to hold the watermark",
            )
        whitened = _whitened_luma(frame)
        total = whitened if total is None else total + whitened
        count += 1
    if total is None:
        return PeriodicReading(found=False, payload=None, frames_read=0, problem="no frames to read")
    return detect(total / count, count)


def read_periodic_mark_file(path: Path | str) -> PeriodicReading:
    """Decode the video at ``path`` with ffmpeg and read its periodic mark; a bad file gives a ``problem``."""
    try:
        return read_periodic_mark(decoded_frames(Path(path)))
    except DecodeFailed as err:
        return PeriodicReading(found=False, payload=None, frames_read=0, problem=str(err))
