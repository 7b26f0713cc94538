"""Content filter: two gates that keep unsafe clips out of the catalog.

Before generation, :class:`PromptPolicy` refuses a prompt that matches a block list, so no
GPU time is spent on it. Policies are TOML files (the packaged ``policies/default.toml`` when
no path is given); see that file for the layout. A team extends the default with its own file::

    extends = "default"          # keep every default rule, add these
    version = 1

    [locales."*".brand]          # "*" applies to every locale
    terms = ["acme cola", "acme*"]

    [locales.de.brand.patterns]  # regexes over the normalised prompt
    rival_slogan = '(?<!\\S)immer (?:\\S+ ){0,2}acme(?!\\S)'

and points the content-policy setting at it (``PromptPolicy.load(path)``). Without
``extends`` the file replaces the default entirely.

After generation, :class:`FrameClassifier` runs NudeNet's body-part detector (``320n.onnx``,
shipped inside the ``nudenet`` wheel, run offline with onnxruntime) over evenly sampled frames
and refuses the clip when a blocked label scores at or above its threshold in any of them.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tomllib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Self

import cv2
import numpy as np
import onnxruntime as ort
from pydantic import model_validator

from tasks.postprod.params import stage_params
from tasks.postprod.report import StageReport, cpu_timer

DEFAULT_POLICY_PATH = Path(__file__).with_name("policies") / "default.toml"
STAGE = "content_filter"

# ---------------------------------------------------------------------------------------------
# Gate (a): the prompt policy


@dataclass(frozen=True)
class PromptDecision:
    """Whether a prompt may be generated; ``rule`` names the first rule that refused it."""

    allowed: bool
    rule: str | None
    locale: str


@dataclass(frozen=True)
class PromptRule:
    """One compiled block rule; ``name`` is ``<locale>/<category>/term:<term>`` or ``.../pattern:<name>``."""

    name: str
    regex: re.Pattern[str]


_SEPARATORS = re.compile(r"[\W_]+")
# Three or more single characters in a row ("n a k e d", from "N.A.K.E.D") spell one word.
_SPELLED_OUT = re.compile(r"(?<!\S)\w(?: \w){2,}(?!\S)")
_LOCALE_KEY = re.compile(r"\*|[a-z]{2,3}")
_CATEGORY_KEYS = {"terms", "patterns"}


def normalise_text(text: str) -> str:
    """Fold ``text`` to the form rules match against.

    NFKC (full-width and ligature forms), casefold, accents and invisible format characters
    (zero-width spaces, soft hyphens) removed, and every run of anything that is not a letter or
    digit reduced to one space: ``"Décapitation, l'ÉTÉ"`` becomes ``"decapitation l ete"``.
    """
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
    kept = "".join(
        char for char in decomposed if not unicodedata.combining(char) and unicodedata.category(char) != "Cf"
    )
    return _SEPARATORS.sub(" ", unicodedata.normalize("NFC", kept)).strip()


def _term_rule(name: str, term: str) -> PromptRule:
    prefix = term.endswith("*")
    words = normalise_text(term.removesuffix("*"))
    if not words:
        raise ValueError(f"policy rule {name!r} has no letters or digits")
    # Words are whole tokens of the normalised prompt: "sex" refuses "sex" but not "Essex".
    end = "" if prefix else r"(?!\S)"
    return PromptRule(name, re.compile(rf"(?<!\S){re.escape(words)}{end}"))


def _pattern_rule(name: str, pattern: str) -> PromptRule:
    try:
        return PromptRule(name, re.compile(pattern))
    except re.error as error:
        raise ValueError(f"policy rule {name!r} is not a valid regex: {error}") from error


def _language(locale: str) -> str:
    """``"de-AT"``, ``"de_at"`` and ``"DE"`` all select the ``de`` lists."""
    return re.split(r"[-_]", locale.strip().casefold(), maxsplit=1)[0] or "*"


class PromptPolicy:
    """Block lists of terms and regex patterns per locale; ``check`` refuses a matching prompt."""

    def __init__(self, rules: Mapping[str, Sequence[PromptRule]], source: str) -> None:
        self.rules = {locale: tuple(locale_rules) for locale, locale_rules in rules.items()}
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> PromptPolicy:
        """Read a policy TOML file; ``None`` reads the packaged default."""
        policy_path = Path(path) if path is not None else DEFAULT_POLICY_PATH
        with policy_path.open("rb") as handle:
            data = tomllib.load(handle)
        return cls.from_mapping(data, source=str(policy_path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str) -> PromptPolicy:
        """Build a policy from parsed TOML; raises ValueError naming what is malformed."""
        unknown = set(data) - {"version", "extends", "locales"}
        if unknown:
            raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)}")
        if data.get("version") != 1:
            raise ValueError(f"{source}: version must be 1, got {data.get('version')!r}")
        extends = data.get("extends")
        if extends not in (None, "default"):
            raise ValueError(f"{source}: extends must be 'default' when set, got {extends!r}")
        rules: dict[str, list[PromptRule]] = {}
        if extends == "default":
            for locale, base_rules in cls.load().rules.items():
                rules.setdefault(locale, []).extend(base_rules)
        for locale, categories in data.get("locales", {}).items():
            if not _LOCALE_KEY.fullmatch(locale):
                raise ValueError(f"{source}: locale {locale!r} is not '*' or a lowercase language code")
            for category, body in categories.items():
                where = f"{locale}/{category}"
                if not isinstance(body, dict) or set(body) - _CATEGORY_KEYS:
                    raise ValueError(f"{source}: [{where}] may only hold {sorted(_CATEGORY_KEYS)}")
                terms = body.get("terms", [])
                patterns = body.get("patterns", {})
                if not isinstance(terms, list) or not all(isinstance(term, str) for term in terms):
                    raise ValueError(f"{source}: [{where}] terms must be a list of strings")
                if not isinstance(patterns, dict) or not all(isinstance(p, str) for p in patterns.values()):
                    raise ValueError(f"{source}: [{where}.patterns] must map names to regex strings")
                locale_rules = rules.setdefault(locale, [])
                locale_rules.extend(_term_rule(f"{where}/term:{term}", term) for term in terms)
                locale_rules.extend(
                    _pattern_rule(f"{where}/pattern:{name}", pattern) for name, pattern in patterns.items()
                )
        return cls(rules, source)

    def check(self, text: str, locale: str | None = None, default_locale: str = "en") -> PromptDecision:
        """Refuse ``text`` when a rule of the ``*`` lists, of ``default_locale``'s language or of ``locale``'s
        matches it.

        The default language's rules always apply: the text encoder (umT5) reads every language in every
        prompt, so a row's locale can add rules but never take the default's away. ``locale`` in the
        decision is the language whose list refused (``*`` for the lists of every language).
        """
        languages = dict.fromkeys(("*", _language(locale or default_locale), _language(default_locale)))
        normalised = normalise_text(text)
        variants = {normalised, _SPELLED_OUT.sub(lambda match: match[0].replace(" ", ""), normalised)}
        for scope in languages:
            for rule in self.rules.get(scope, ()):
                if any(rule.regex.search(variant) for variant in variants):
                    return PromptDecision(allowed=False, rule=rule.name, locale=scope)
        return PromptDecision(allowed=True, rule=None, locale=_language(locale or default_locale))


# ---------------------------------------------------------------------------------------------
# Gate (b): the frame classifier

# NudeNet 3.4.2's class order: index i of the model's class scores is NUDENET_LABELS[i].
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)

# The explicit classes. Genitalia and anus refuse at a lower score than breasts and buttocks,
# whose classes also fire on skin-toned product shots: skimage's coffee-cup photo scores
# BUTTOCKS_EXPOSED 0.30 over the whole frame.
DEFAULT_BLOCKED_LABELS: dict[str, float] = {
    "FEMALE_GENITALIA_EXPOSED": 0.35,
    "MALE_GENITALIA_EXPOSED": 0.35,
    "ANUS_EXPOSED": 0.35,
    "FEMALE_BREAST_EXPOSED": 0.45,
    "BUTTOCKS_EXPOSED": 0.45,
}

# NudeNet's own decoding: candidates from 0.2, non-maximum suppression keeps scores >= 0.25.
_INPUT_SIZE = 320
_CANDIDATE_SCORE = 0.2
_NMS_SCORE = 0.25
_NMS_IOU = 0.45


@stage_params
class FrameFilterParams:
    """What the frame gate samples and what refuses a clip.

    A blocked label refuses the clip when any sampled frame has a detection of it scoring at or
    above its threshold (NudeNet reports nothing under 0.25, so lower thresholds act as 0.25).
    Detections whose box covers less than ``min_box_area_fraction`` of the frame are ignored.
    """

    enabled: bool = True
    sample_frames: int = 16
    blocked_labels: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_BLOCKED_LABELS))
    min_box_area_fraction: float = 0.001

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.sample_frames < 1:
            raise ValueError(f"sample_frames must be at least 1, got {self.sample_frames}")
        if not 0.0 <= self.min_box_area_fraction < 1.0:
            raise ValueError(f"min_box_area_fraction must be in [0, 1), got {self.min_box_area_fraction}")
        unknown = set(self.blocked_labels) - set(NUDENET_LABELS)
        if unknown:
            raise ValueError(f"unknown labels {sorted(unknown)}; the detector knows {list(NUDENET_LABELS)}")
        for label, threshold in self.blocked_labels.items():
            if not 0.0 < threshold <= 1.0:
                raise ValueError(f"threshold for {label} must be in (0, 1], got {threshold}")
        return self


@dataclass(frozen=True)
class FrameDecision:
    """The frame gate's verdict for one clip.

    ``max_scores`` holds every label the detector knows with its highest score over the sampled
    frames (0.0: no detection of it); ``reasons`` has one line per blocked label that refused.
    """

    allowed: bool
    reasons: tuple[str, ...]
    max_scores: dict[str, float]
    sampled_frames: tuple[int, ...]


def sample_indices(n_frames: int, count: int) -> list[int]:
    """``count`` evenly spaced frame indices from first to last (the middle one when ``count`` is 1)."""
    if n_frames < 1 or count < 1:
        raise ValueError(f"need at least one frame and one sample, got {n_frames} and {count}")
    if count >= n_frames:
        return list(range(n_frames))
    if count == 1:
        return [(n_frames - 1) // 2]
    return np.linspace(0, n_frames - 1, count).round().astype(int).tolist()


def _session(intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # Idle workers must not spin: other clips' filters share the host's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = files("nudenet") / "320n.onnx"
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


class FrameClassifier:
    """NudeNet's detector over sampled frames; the model loads when it is made, so a worker makes one
    (:class:`tasks.publish.Finisher`) and classifies every clip with it.

    ``intra_op_threads`` is onnxruntime's thread count for one inference: 1 keeps a filter on one
    core so a host can filter as many clips in parallel as it has cores.
    """

    def __init__(self, intra_op_threads: int = 1) -> None:
        if intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be at least 1, got {intra_op_threads}")
        self.intra_op_threads = intra_op_threads
        self.session = _session(intra_op_threads)
        self._input_name = self.session.get_inputs()[0].name
        self._model = f"nudenet {importlib.metadata.version('nudenet')} 320n.onnx"

    def classify(self, frames: np.ndarray, params: FrameFilterParams) -> tuple[FrameDecision, StageReport]:
        """Score ``params.sample_frames`` evenly spaced frames of uint8 RGB ``frames`` (n, h, w, 3)."""
        report = StageReport(stage=STAGE, applied=params.enabled, params=self._report_params(params))
        if not params.enabled:
            report.outcome = {"allowed": True, "skipped": "disabled"}
            return FrameDecision(allowed=True, reasons=(), max_scores={}, sampled_frames=()), report
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
            raise ValueError(f"expected uint8 RGB frames (n, h, w, 3), got {frames.dtype} {frames.shape}")
        with cpu_timer(report):
            indices = sample_indices(len(frames), params.sample_frames)
            max_scores = dict.fromkeys(NUDENET_LABELS, 0.0)
            hits: dict[str, list[int]] = {}
            for index in indices:
                for label, score, area in self._detect(frames[index]):
                    if area < params.min_box_area_fraction:
                        continue
                    max_scores[label] = max(max_scores[label], score)
                    threshold = params.blocked_labels.get(label)
                    if threshold is not None and score >= threshold:
                        hits.setdefault(label, []).append(index)
            reasons = tuple(
                f"{label} scored {max_scores[label]:.3f} >= {params.blocked_labels[label]} "
                f"in frames {sorted(set(frame_indices))}"
                for label, frame_indices in hits.items()
            )
        decision = FrameDecision(
            allowed=not reasons,
            reasons=reasons,
            max_scores={label: round(score, 4) for label, score in max_scores.items()},
            sampled_frames=tuple(indices),
        )
        report.outcome = {
            "allowed": decision.allowed,
            "reasons": list(reasons),
            "max_scores": decision.max_scores,
            "sampled_frames": list(indices),
            "frames_total": len(frames),
        }
        return decision, report

    def _report_params(self, params: FrameFilterParams) -> dict[str, Any]:
        return {
            "enabled": params.enabled,
            "sample_frames": params.sample_frames,
            "blocked_labels": dict(params.blocked_labels),
            "min_box_area_fraction": params.min_box_area_fraction,
            "model": self._model,
            "intra_op_threads": self.intra_op_threads,
        }

    def _detect(self, frame: np.ndarray) -> list[tuple[str, float, float]]:
        """(label, score, box area / frame area) for each detection in one RGB frame."""
        height, width = frame.shape[:2]
        side = max(height, width)
        # NudeNet's preprocessing: pad right and bottom to a square, resize, scale to [0, 1].
        # The model wants RGB, which these frames already are (nudenet 3.4.2's own file path
        # feeds it BGR: notAI-tech/NudeNet#203).
        square = cv2.copyMakeBorder(
            np.ascontiguousarray(frame), 0, side - height, 0, side - width, cv2.BORDER_CONSTANT, value=0
        )
        blob = cv2.dnn.blobFromImage(square, 1 / 255.0, (_INPUT_SIZE, _INPUT_SIZE), swapRB=False, crop=False)
        (output,) = self.session.run(None, {self._input_name: blob})
        rows = output[0].T  # one row per anchor: cx, cy, w, h, then a score per class
        class_scores = rows[:, 4:]
        best = class_scores.max(axis=1)
        keep = best >= _CANDIDATE_SCORE
        if not keep.any():
            return []
        labels = class_scores[keep].argmax(axis=1)
        scores = best[keep]
        cx, cy, box_w, box_h = (rows[keep, :4] * (side / _INPUT_SIZE)).T
        x = np.clip(cx - box_w / 2, 0, width)
        y = np.clip(cy - box_h / 2, 0, height)
        box_w = np.minimum(box_w, width - x)
        box_h = np.minimum(box_h, height - y)
        boxes = np.stack([x, y, box_w, box_h], axis=1)
        kept = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), _NMS_SCORE, _NMS_IOU)
        frame_area = float(height * width)
        return [
            (NUDENET_LABELS[labels[i]], float(scores[i]), float(box_w[i] * box_h[i]) / frame_area)
            for i in np.asarray(kept, dtype=int).reshape(-1)
        ]
