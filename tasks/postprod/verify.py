"""Verifying a published clip: its C2PA manifest and its invisible watermark, in one verdict.

The two marks back each other up. The manifest is signed and states the clip and run but
lives in the file's container, so any re-encode drops it; the watermark lives in the pixels
and survives a re-encode, a resize, a crop and a frame-rate change, but only carries 48 bits.
A clip verifies when its manifest is intact, trusted and labelled as AI-generated, and its
watermark carries the payload derived from the manifest's clip and run ids.

The watermark is read as the periodic luma mark (:mod:`tasks.postprod.periodic_mark`); when
that is not found, as the dwtDctSvd chroma mark that clips made before it carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.postprod.invisible import (
    InvisibleWatermarkParams,
    WatermarkReading,
    format_payload,
    payload_for,
    read_watermark_file,
)
from tasks.postprod.periodic_mark import PeriodicReading, read_periodic_mark_file
from tasks.postprod.provenance import ProvenanceParams, ProvenanceReading, read_provenance


@dataclass(frozen=True)
class VerifyReport:
    """The manifest reading, the watermark reading, and what they add up to.

    ``expected_payload_hex`` is the watermark payload the manifest's clip and run ids
    imply (None without those facts). ``problems`` lists every reason the clip does not
    verify, in words; ``ok`` means there are none.
    """

    path: str
    provenance: ProvenanceReading
    watermark: PeriodicReading | WatermarkReading
    expected_payload_hex: str | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when the manifest is trusted and AI-labelled and the watermark matches it."""
        return not self.problems

    def describe(self) -> str:
        """A few lines for a person: the verdict, then what each mark says."""
        prov, mark = self.provenance, self.watermark
        lines = [f"{self.path}: {'VERIFIED' if self.ok else 'NOT VERIFIED'}"]
        lines += [f"  problem: {problem}" for problem in self.problems]
        if prov.has_manifest:
            lines.append(
                f"  C2PA manifest: {prov.validation_state}, signed by {prov.signer or 'unknown signer'}"
            )
            if prov.ai_generated:
                lines.append("    AI-generated (IPTC digital source type trainedAlgorithmicMedia)")
            model = " ".join(filter(None, (prov.model_name, prov.model_version))) or "not stated"
            lines.append(f"    model {model}; clip {prov.clip_id}; run {prov.run_id}")
            lines.append(f"    claim generator {prov.claim_generator}")
            lines += [f"    validation error: {error}" for error in prov.validation_errors]
        else:
            lines.append(f"  C2PA manifest: none ({prov.error})")
        lines.append(f"  watermark: {mark.summary()}")
        if mark.payload is not None:
            lines.append(f"    expected payload {self.expected_payload_hex or 'unknown'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": list(self.problems),
            "expected_payload_hex": self.expected_payload_hex,
            "provenance": self.provenance.to_dict(),
            "watermark": self.watermark.to_dict(),
        }


def _problems(
    prov: ProvenanceReading, mark: PeriodicReading | WatermarkReading, expected: int | None
) -> list[str]:
    problems = []
    if not prov.has_manifest:
        problems.append(prov.error or "no C2PA manifest")
    elif prov.validation_state == "Invalid":
        problems.append("the C2PA manifest does not validate: the file or its manifest was changed")
    elif not prov.trusted:
        problems.append(f"the C2PA signer is not trusted ({prov.validation_state}): give the trust anchor")
    if prov.has_manifest and not prov.ai_generated:
        problems.append("the C2PA manifest does not label the clip as AI-generated")
    if not mark.found:
        problems.append(f"no invisible watermark found{f': {mark.problem}' if mark.problem else ''}")
    elif expected is not None and mark.payload != expected:
        problems.append("the watermark payload does not match the manifest's clip and run")
    return problems


def verify_clip(
    path: Path | str,
    trust: ProvenanceParams | Path | str | None = None,
    watermark: InvisibleWatermarkParams | None = None,
) -> VerifyReport:
    """Check the clip at ``path``: its C2PA manifest against ``trust``, and its watermark.

    ``trust`` is a trust anchor PEM path, or provenance params whose ``trust_anchor`` is used;
    without one, only c2pa's built-in trust list counts, so a development chain reads
    Valid, not Trusted, and the clip does not verify. ``watermark`` must match the
    embedder's params for the dwtDctSvd mark of older clips (default: its defaults); the periodic
    mark needs none. Never raises on a bad or foreign file.
    """
    anchor = trust.trust_anchor if isinstance(trust, ProvenanceParams) else trust
    prov = read_provenance(path, anchor)
    mark: PeriodicReading | WatermarkReading = read_periodic_mark_file(path)
    if not mark.found and mark.problem is None:
        legacy = read_watermark_file(path, watermark or InvisibleWatermarkParams())
        if legacy.found:
            mark = legacy
    expected = payload_for(prov.clip_id, prov.run_id) if prov.clip_id and prov.run_id else None
    return VerifyReport(
        path=str(path),
        provenance=prov,
        watermark=mark,
        expected_payload_hex=None if expected is None else format_payload(expected),
        problems=tuple(_problems(prov, mark, expected)),
    )
