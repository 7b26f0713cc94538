"""C2PA provenance and clip verification with the real c2pa library, a generated dev chain and libx264."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tasks.encode import encode_mp4
from tasks.postprod.errors import PostprocessError
from tasks.postprod.invisible import embed_watermark, format_payload, payload_for
from tasks.postprod.provenance import (
    TRAINED_ALGORITHMIC_MEDIA,
    ProvenanceFacts,
    ProvenanceParams,
    ensure_dev_certificate_chain,
    read_provenance,
    sign_clip,
)
from tasks.postprod.verify import verify_clip
from tests.media import probe_video, top_level_boxes
from tests.test_invisible_watermark import textured_clip

pytestmark = pytest.mark.services  # runs ffmpeg

FACTS = ProvenanceFacts(
    clip_id="sku-123-a1b2c3",
    run_id="nightly-2026-11-21",
    model_name="Wan2.2-T2V-A14B",
    model_version="diffusers-0.42.1",
    extra={"sku": "sku-123"},
)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return ensure_dev_certificate_chain(tmp_path_factory.mktemp("c2pa-dev"))


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory) -> Path:
    """The clip as the pipeline publishes it: watermarked, then encoded with libx264."""
    frames, _ = embed_watermark(textured_clip(frames=16), payload_for(FACTS.clip_id, FACTS.run_id))
    return encode_mp4(frames, fps=16, path=tmp_path_factory.mktemp("clip") / "clip.mp4", crf=23)


@pytest.fixture(scope="module")
def signed(chain, unsigned, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("signed") / "clip.mp4"
    report = sign_clip(unsigned, path, FACTS, ProvenanceParams.for_chain(chain))
    assert report.applied and report.outcome["validation_state"] == "Trusted", report
    assert "BEGIN" not in json.dumps(report.params)  # paths to the key, never the key
    return path


def mdat_payload(path: Path) -> tuple[int, int]:
    """(offset, size) of the media data inside the top-level mdat box."""
    data, offset = path.read_bytes(), 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[offset + 8 : offset + 16])[0], 16
        if kind == b"mdat":
            return offset + header, size - header
        offset += size
    raise AssertionError(f"no mdat in {path}")


def test_dev_chain_is_made_once_as_an_es256_ca_and_leaf(chain):
    again = ensure_dev_certificate_chain(chain.root_cert.parent)
    assert again == chain
    assert again.signer_chain.read_bytes() == chain.signer_chain.read_bytes()
    root = x509.load_pem_x509_certificate(chain.root_cert.read_bytes())
    leaf, *rest = x509.load_pem_x509_certificates(chain.signer_chain.read_bytes())
    assert rest == [root]
    leaf.verify_directly_issued_by(root)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in eku
    assert (
        isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        and leaf.public_key().curve.name == "secp256r1"
    )
    assert chain.signer_key.stat().st_mode & 0o077 == 0


def test_signed_clip_reads_trusted_with_the_ai_model_and_run_facts(signed, chain):
    reading = read_provenance(signed, trust_anchors=chain.root_cert)
    assert reading.has_manifest and reading.validation_state == "Trusted" and reading.trusted
    assert reading.validation_errors == ()
    assert reading.ai_generated and reading.digital_source_type == TRAINED_ALGORITHMIC_MEDIA
    assert (reading.model_name, reading.model_version) == (FACTS.model_name, FACTS.model_version)
    assert (reading.clip_id, reading.run_id) == (FACTS.clip_id, FACTS.run_id)
    assert reading.claim_generator.startswith("wanfactory ") and "development signer" in reading.signer
    labels = {assertion["label"] for assertion in reading.manifest["assertions"]}
    assert {"c2pa.actions.v2", "com.wanfactory.clip"} <= labels
    json.dumps(reading.to_dict())
    # Still a clip every player takes: H.264, all frames, the index before the media data.
    info = probe_video(signed)
    assert (info.codec, info.frames) == ("h264", 16)
    boxes = top_level_boxes(signed)
    assert boxes.index("moov") < boxes.index("mdat"), boxes


def test_without_the_trust_anchor_the_signature_is_valid_but_not_trusted(signed):
    reading = read_provenance(signed)
    assert reading.validation_state == "Valid" and not reading.trusted
    assert any(error.startswith("signingCredential.untrusted") for error in reading.validation_errors)


def test_one_flipped_byte_in_the_media_data_fails_validation(signed, chain, tmp_path):
    tampered = tmp_path / "tampered.mp4"
    data = bytearray(signed.read_bytes())
    start, size = mdat_payload(signed)
    data[start + size // 2] ^= 0x01
    tampered.write_bytes(data)

    reading = read_provenance(tampered, trust_anchors=chain.root_cert)
    assert reading.validation_state == "Invalid" and not reading.trusted
    assert any(error.startswith("assertion.bmffHash.mismatch") for error in reading.validation_errors)
    report = verify_clip(tampered, chain.root_cert)
    assert not report.ok and any("was changed" in problem for problem in report.problems)


def test_a_clip_without_a_manifest_says_so(unsigned, chain):
    reading = read_provenance(unsigned, trust_anchors=chain.root_cert)
    assert not reading.has_manifest and reading.validation_state is None
    assert reading.error == "no C2PA manifest in the file"
    report = verify_clip(unsigned, chain.root_cert)
    assert not report.ok and report.problems[0].startswith("no C2PA manifest")
    # The pixels still carry the clip's identity.
    assert report.watermark.found
    assert report.watermark.payload == payload_for(FACTS.clip_id, FACTS.run_id)
    assert "C2PA manifest: none" in report.describe()


def test_verify_reports_manifest_and_watermark_of_a_published_clip(signed, chain):
    report = verify_clip(signed, ProvenanceParams.for_chain(chain))
    assert report.ok and report.problems == (), report.describe()
    expected = format_payload(payload_for(FACTS.clip_id, FACTS.run_id))
    assert report.expected_payload_hex == report.watermark.payload_hex == expected
    assert report.watermark.confidence > 0.75
    text = report.describe()
    assert text.startswith(f"{signed}: VERIFIED") and "Trusted" in text and expected in text
    assert "AI-generated" in text and FACTS.model_name in text
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["ok"] and as_dict["watermark"]["payload_hex"] == expected
    assert as_dict["provenance"]["validation_state"] == "Trusted"


def test_signing_in_place_keeps_one_valid_file(signed, chain, tmp_path):
    path = tmp_path / "clip.mp4"
    shutil.copyfile(signed, path)
    other = ProvenanceFacts(FACTS.clip_id, FACTS.run_id, FACTS.model_name, "next")
    sign_clip(path, path, other, ProvenanceParams.for_chain(chain))
    reading = read_provenance(path, trust_anchors=chain.root_cert)
    assert reading.trusted and reading.model_version == "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_signing_without_a_key_is_a_clear_error(unsigned, tmp_path):
    with pytest.raises(PostprocessError, match="needs cert_chain and private_key"):
        sign_clip(unsigned, tmp_path / "out.mp4", FACTS, ProvenanceParams())


def test_verify_never_crashes_on_a_file_that_is_not_a_video(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x08free" + b"garbage" * 50)
    report = verify_clip(junk)
    assert not report.ok and len(report.problems) == 2
    assert "NOT VERIFIED" in report.describe()
