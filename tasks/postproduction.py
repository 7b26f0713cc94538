"""A run's post-production setup, made once from settings: profiles, prompt policy, signing chain.

Everything here is read before the first clip is planned, so a broken profile file, a missing
logo or unreadable certificates stop the run at its start with one clear error instead of
failing every clip after GPU time was spent on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont

from catalogs.sources import read_bytes
from infra.objectstore import ObjectStore
from infra.settings import Settings
from tasks.postprod.content_filter import PromptPolicy
from tasks.postprod.profile import PostprocessProfile, ProfileError, load_profiles
from tasks.postprod.provenance import ProvenanceParams, ensure_dev_certificate_chain
from tasks.publish import FinishingContext


@dataclass(frozen=True)
class Postproduction:
    profiles: dict[str, PostprocessProfile]  # by name, with their logos' digests
    default_profile: str
    prompt_policy: PromptPolicy
    finishing: FinishingContext


def provenance_params(settings: Settings) -> ProvenanceParams:
    """The C2PA signer from settings, or a development chain under the state directory."""
    if settings.c2pa_cert_chain is None:
        return ProvenanceParams.for_chain(ensure_dev_certificate_chain(settings.state_dir / "c2pa"))
    if settings.c2pa_private_key is None:
        raise ProfileError("WANFACTORY_C2PA_CERT_CHAIN is set but WANFACTORY_C2PA_PRIVATE_KEY is not")
    return ProvenanceParams(
        cert_chain=settings.c2pa_cert_chain,
        private_key=settings.c2pa_private_key,
        trust_anchor=settings.c2pa_trust_anchor,
    )


def trust_anchor(settings: Settings) -> Path | None:
    """The root a verifier of this deployment's clips should trust."""
    return provenance_params(settings).trust_anchor


def prepare_postproduction(settings: Settings) -> Postproduction:
    """Load and check the profiles (reading their logos), the prompt policy and the signing chain."""
    store = ObjectStore(settings.object_store())
    profiles = {}
    for name, profile in load_profiles(settings.postprocess_profiles_path).items():
        logo = None
        if profile.logo_location:
            try:
                logo = read_bytes(profile.logo_location, store.client)
            except Exception as err:
                raise ProfileError(f"profile {name!r}: cannot read logo {profile.logo_uri!r}: {err}") from err
        _check_label_font(name, profile)
        profiles[name] = profile.with_logo_digest(logo)
    if settings.postprocess_profile not in profiles:
        wanted = settings.postprocess_profile
        raise ProfileError(f"WANFACTORY_POSTPROCESS_PROFILE={wanted!r} is not one of {sorted(profiles)}")
    return Postproduction(
        profiles=profiles,
        default_profile=settings.postprocess_profile,
        prompt_policy=PromptPolicy.load(settings.content_policy_path),
        finishing=FinishingContext(
            store=settings.object_store(),
            profiles=profiles,
            provenance=provenance_params(settings),
            threads=settings.postprocess_threads,
            upload_retry_seconds=settings.upload_retry_seconds,
        ),
    )


def _check_label_font(name: str, profile: PostprocessProfile) -> None:
    """A label font missing on this host (fonts-dejavu-core not installed) would fail every clip at the
    visible watermark: say so once, at the start of the run."""
    mark = profile.visible_watermark
    if not mark.text:
        return
    try:
        ImageFont.truetype(mark.font_path, 12)
    except OSError as err:
        raise ProfileError(
            f"profile {name!r}: cannot load the label font {mark.font_path!r} ({err}); install "
            "fonts-dejavu-core (infra/setup.sh does) or set visible_watermark.font_path in the profile"
        ) from err
