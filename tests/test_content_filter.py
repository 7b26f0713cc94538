"""The content filter's two gates, on the packaged policy and the real NudeNet model, offline.

We cannot ship explicit images, so refusals by the frame gate are shown with real detections on
innocuous photos from scikit-image (a test-only dependency): a policy that blocks faces refuses
the astronaut portrait, one that blocks BUTTOCKS_EXPOSED at NudeNet's floor refuses a coffee cup.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from nudenet import NudeDetector
from PIL import Image
from skimage import data

from tasks.postprod.content_filter import (
    DEFAULT_BLOCKED_LABELS,
    NUDENET_LABELS,
    FrameClassifier,
    FrameFilterParams,
    PromptPolicy,
    sample_indices,
)

MUG_PHOTO = Path(__file__).resolve().parents[1] / "catalogs" / "sample" / "images" / "mug.png"
SIZE = 512  # the astronaut's size, so it can stand in for one frame of a clip


@pytest.fixture(scope="module")
def policy() -> PromptPolicy:
    return PromptPolicy.load()


@pytest.fixture(scope="module")
def classifier() -> FrameClassifier:
    return FrameClassifier()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


def product_frames(count: int) -> np.ndarray:
    """A clip of product shots: the sample catalog's mug render and a lit gradient scene, drifting."""
    mug = np.asarray(Image.open(MUG_PHOTO).convert("RGB").resize((SIZE, SIZE)))
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    scene = np.stack([60 + 120 * rows, 90 + 100 * cols, 160 + 60 * rows * cols], axis=-1)
    product = (rows - 0.55) ** 2 / 0.06 + (cols - 0.5) ** 2 / 0.03 < 1  # an elliptical bottle
    scene[product] = [200, 40, 40] * (1.1 - cols[product, None] * 0.6)
    scene = scene.clip(0, 255).astype(np.uint8)
    return np.stack([np.roll(mug if i % 2 else scene, 4 * i, axis=1) for i in range(count)])


# Gate (a): prompts


def test_blocked_terms_are_refused_with_the_rule_named(policy: PromptPolicy) -> None:
    decision = policy.check("A topless model holding the perfume bottle", "en")
    assert (decision.allowed, decision.rule, decision.locale) == (False, "en/sexual/term:topless", "en")
    assert policy.check("Slow-motion beheading on a beach", "en").rule == "en/violence/term:behead*"
    assert policy.check("Gory close-up", "en").rule == "en/violence/pattern:gore"


@pytest.mark.parametrize(
    ("text", "locale", "rule"),
    [
        ("TOPLESS model", "en", "en/sexual/term:topless"),
        ("Tópless model", "en", "en/sexual/term:topless"),
        ("ＴＯＰＬＥＳＳ model", "en", "en/sexual/term:topless"),  # full-width letters
        ("top\u00adless model", "en", "en/sexual/term:topless"),  # a soft hyphen inside
        ("T.O.P.L.E.S.S model", "en", "en/sexual/term:topless"),
        ("Décapitation au ralenti", "fr", "fr/violence/term:décapit*"),
        ("DECAPITATION au ralenti", "fr", "fr/violence/term:décapit*"),
        ("un vídeo PORNOGRÁFICO", "es", "*/sexual/term:porn*"),
        ("Ethnische Säuberung", "de", "de/hate/term:ethnische säuberung*"),
    ],
)
def test_case_accent_and_unicode_variants_match_the_same_rule(
    policy: PromptPolicy, text: str, locale: str, rule: str
) -> None:
    decision = policy.check(text, locale)
    assert (decision.allowed, decision.rule) == (False, rule)


@pytest.mark.parametrize(
    ("text", "locale"),
    [
        ("A matte blue ceramic mug on a walnut table, soft morning light, slow 360° turn", "en"),
        ("Gore-Tex rain jacket on a windswept ridge", "en"),
        ("Nude lipstick and a glue gun on a marble counter", "en"),
        ("Behind the scenes of a photo shoot with a woman in a linen dress", "en"),
        ("Diamond clarity visible to the naked eye", "en"),
        ("Kids' water gun for summer fun", "en"),
        ("Pieds nus dans le sable, sandales en cuir", "fr"),
        ("Ein Kinderwagen im Park, weiches Licht", "de"),
    ],
)
def test_benign_product_prompts_are_admitted(policy: PromptPolicy, text: str, locale: str) -> None:
    assert policy.check(text, locale).allowed


def test_whole_word_terms_do_not_match_inside_other_words(policy: PromptPolicy) -> None:
    assert policy.check("sex", "en").rule == "en/sexual/term:sex"
    assert policy.check("A unisex sextant paperweight from Middlesex, shipped to Scunthorpe", "en").allowed
    # A trailing * opts a term into prefix matching, still from the start of a word.
    assert policy.check("Grenades", "en").rule == "en/weapons/term:grenade*"


def test_locale_specific_terms_apply_only_in_their_locale(policy: PromptPolicy) -> None:
    text = "Nackte Frau am Strand"
    assert policy.check(text, "de").rule == "de/sexual/term:nackte"
    regional = policy.check(text, "de-AT")
    assert (regional.allowed, regional.locale) == (False, "de")
    assert policy.check(text, "en").allowed
    assert policy.check(text, "fr").allowed
    # '*' rules apply everywhere, including locales the policy has no lists for.
    for locale in ("en", "de", "fr", "es", "pt-BR"):
        assert policy.check("hentai style", locale).rule == "*/sexual/term:hentai"


def test_minors_in_unsafe_contexts_are_refused(policy: PromptPolicy) -> None:
    assert policy.check("Two kids sitting by the pool in sexy swimwear", "en").rule == (
        "en/minors/pattern:sexualised"
    )
    assert policy.check("children drinking alcohol at a party", "en").rule == "en/minors/pattern:hazards"
    assert policy.check("Una niña en lencería", "es").rule == "es/minors/pattern:sexualised"
    assert policy.check("Two kids sitting by the pool in striped swimwear", "en").allowed


def test_a_custom_policy_is_loaded_from_a_path(tmp_path: Path) -> None:
    extended = tmp_path / "brand.toml"
    extended.write_text(
        'extends = "default"\nversion = 1\n\n'
        '[locales."*".brand]\nterms = ["Acme Cola"]\n\n'
        "[locales.de.brand.patterns]\nrival_slogan = '(?<!\\S)immer (?:\\S+ ){0,2}acme(?!\\S)'\n",
        encoding="utf-8",
    )
    policy = PromptPolicy.load(extended)
    assert policy.source == str(extended)
    assert policy.check("A can of ACME-COLA on ice", "fr").rule == "*/brand/term:Acme Cola"
    assert policy.check("Immer wieder Acme!", "de").rule == "de/brand/pattern:rival_slogan"
    assert policy.check("Immer wieder Acme!", "en").allowed
    assert policy.check("topless", "en").rule == "en/sexual/term:topless"  # the default still applies

    alone = tmp_path / "alone.toml"
    alone.write_text('version = 1\n[locales.en.brand]\nterms = ["acme*"]\n', encoding="utf-8")
    policy = PromptPolicy.load(alone)
    assert policy.check("Acmeville", "en").rule == "en/brand/term:acme*"
    assert policy.check("topless", "en").allowed


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("version = 1\n[locales.en.x.patterns]\nbad = '(unclosed'\n", "en/x/pattern:bad"),
        ("version = 1\n[locales.en.x]\nword = ['a']\n", "may only hold"),
        ("version = 2\n", "version must be 1"),
        ("version = 1\n[locales.EN.x]\nterms = ['a']\n", "language code"),
        ("version = 1\n[locales.en.x]\nterms = ['***']\n", "no letters or digits"),
        ("version = 1\n[locales.en.x]\nterms = 'porn'\n", "list of strings"),
    ],
)
def test_malformed_policies_are_rejected(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        PromptPolicy.load(path)


# Gate (b): frames


def test_sampling_picks_evenly_spaced_frames() -> None:
    assert sample_indices(81, 5) == [0, 20, 40, 60, 80]
    sixteen = sample_indices(81, 16)
    assert (sixteen[0], sixteen[-1], len(sixteen)) == (0, 80, 16)
    assert set(np.diff(sixteen)) <= {5, 6}
    assert sample_indices(81, 1) == [40]
    assert sample_indices(4, 16) == [0, 1, 2, 3]


def test_benign_product_frames_are_admitted_with_scores(classifier: FrameClassifier) -> None:
    frames = product_frames(33)
    decision, report = classifier.classify(frames, FrameFilterParams())
    assert decision.allowed and decision.reasons == ()
    assert decision.sampled_frames == tuple(sample_indices(33, 16))
    assert set(decision.max_scores) == set(NUDENET_LABELS)
    assert all(decision.max_scores[label] < threshold for label, threshold in DEFAULT_BLOCKED_LABELS.items())
    assert report.stage == "content_filter" and report.applied
    assert report.outcome["max_scores"] == decision.max_scores
    assert report.params["intra_op_threads"] == 1
    assert report.params["model"] == "nudenet 3.4.2 320n.onnx"
    assert report.cpu_seconds > 0


def test_a_blocked_label_found_on_a_real_photo_refuses_and_the_default_admits_it(
    classifier: FrameClassifier, astronaut: np.ndarray
) -> None:
    frames = astronaut[None]
    default, _ = classifier.classify(frames, FrameFilterParams())
    assert default.allowed
    assert default.max_scores["FACE_FEMALE"] > 0.7  # reported though not blocked

    faces = FrameFilterParams(blocked_labels={"FACE_FEMALE": 0.5})
    refused, report = classifier.classify(frames, faces)
    assert not refused.allowed
    (reason,) = refused.reasons
    assert re.fullmatch(r"FACE_FEMALE scored 0\.8\d\d >= 0\.5 in frames \[0\]", reason)
    assert report.outcome["allowed"] is False

    # The face covers 3.7% of the frame: a larger minimum box ignores it.
    large_only = FrameFilterParams(blocked_labels={"FACE_FEMALE": 0.5}, min_box_area_fraction=0.05)
    ignored, _ = classifier.classify(frames, large_only)
    assert ignored.allowed and ignored.max_scores["FACE_FEMALE"] == 0.0


def test_default_thresholds_sit_above_a_real_false_positive(classifier: FrameClassifier) -> None:
    coffee = data.coffee()[None]  # a cup of coffee that NudeNet scores BUTTOCKS_EXPOSED ~0.30
    default, _ = classifier.classify(coffee, FrameFilterParams())
    assert default.allowed
    assert 0.25 <= default.max_scores["BUTTOCKS_EXPOSED"] < DEFAULT_BLOCKED_LABELS["BUTTOCKS_EXPOSED"]
    strict, _ = classifier.classify(coffee, FrameFilterParams(blocked_labels={"BUTTOCKS_EXPOSED": 0.25}))
    assert not strict.allowed and strict.reasons[0].startswith("BUTTOCKS_EXPOSED")


def test_scores_match_nudenets_own_detector(classifier: FrameClassifier, astronaut: np.ndarray) -> None:
    # NudeDetector.detect on an RGB array feeds the model RGB, as the filter does.
    for photo in (astronaut, data.coffee()):
        (expected,) = NudeDetector().detect(np.ascontiguousarray(photo))
        decision, _ = classifier.classify(photo[None], FrameFilterParams(min_box_area_fraction=0.0))
        found = {label: score for label, score in decision.max_scores.items() if score > 0}
        assert found == {expected["class"]: pytest.approx(expected["score"], abs=1e-4)}


def test_a_blocked_label_in_one_sampled_frame_refuses_the_clip(
    classifier: FrameClassifier, astronaut: np.ndarray
) -> None:
    faces = FrameFilterParams(sample_frames=5, blocked_labels={"FACE_FEMALE": 0.5})
    frames = product_frames(9)
    frames[4] = astronaut
    decision, _ = classifier.classify(frames, faces)
    assert decision.sampled_frames == (0, 2, 4, 6, 8)
    assert not decision.allowed
    assert decision.reasons[0].endswith("in frames [4]")

    frames = product_frames(9)
    frames[3] = astronaut  # between two sampled frames: not seen
    assert classifier.classify(frames, faces)[0].allowed


def test_disabled_filter_reports_it_was_not_applied(classifier: FrameClassifier) -> None:
    decision, report = classifier.classify(product_frames(2), FrameFilterParams(enabled=False))
    assert decision.allowed and decision.max_scores == {}
    assert not report.applied and report.outcome == {"allowed": True, "skipped": "disabled"}


def test_bad_inputs_are_rejected(classifier: FrameClassifier) -> None:
    with pytest.raises(ValueError, match="uint8 RGB"):
        classifier.classify(product_frames(2).astype(np.float32), FrameFilterParams())
    with pytest.raises(ValueError, match="unknown labels"):
        FrameFilterParams(blocked_labels={"WEAPON": 0.5})
    with pytest.raises(ValueError, match="threshold"):
        FrameFilterParams(blocked_labels={"ANUS_EXPOSED": 1.5})
