"""The one settings object of wanfactory, read from the environment.

Every knob has a documented default that runs the demo against the local stack
(`wanfactory stack up`). Production overrides them with ``WANFACTORY_*``
variables (or a ``.env`` file in the working directory). Secrets are
``SecretStr`` so they never appear in logs, reprs or Prefect parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STATE_DIR = Path.home() / ".wanfactory"
# USD per GPU-hour by GPU type (tasks.cost.gpu_type_key): placeholders (round figures, checked against no
# provider's prices), to be replaced by what the fleet really pays. A CPU actor (demo, tests) costs nothing.
DEFAULT_GPU_PRICE_PER_HOUR = {"H200": 3.80, "H100": 3.00, "A100": 1.80, "L4": 0.80, "A10G": 1.00, "cpu": 0.0}


@dataclass(frozen=True)
class ObjectStoreConfig:
    """Connection facts for one S3 endpoint (MinIO in production)."""

    endpoint: str
    access_key: str
    secret_key: SecretStr
    bucket: str
    secure: bool = False
    region: str = "us-east-1"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    retries: int = 3  # for connection failures, timeouts and 5xx answers; never for refused credentials


class Settings(BaseSettings):
    """wanfactory configuration; each field is ``WANFACTORY_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="WANFACTORY_", env_file=".env", extra="ignore")

    # Object storage (MinIO in production; the local stack's S3 server by default).
    s3_endpoint: str = Field("127.0.0.1:7480", description="host:port of the S3 endpoint")
    s3_access_key: str = Field("wanfactory", description="S3 access key")
    s3_secret_key: SecretStr = Field(
        SecretStr("wanfactory-local-secret"),
        description="S3 secret key (the default is the local stack's development key)",
    )
    s3_secure: bool = Field(False, description="use HTTPS for the S3 endpoint")
    s3_region: str = Field("us-east-1", description="S3 region name")
    s3_bucket: str = Field("wanfactory", description="bucket for clips, manifests, catalogs and models")
    s3_connect_timeout_seconds: float = Field(5.0, gt=0, description="S3: seconds to open a connection")
    s3_read_timeout_seconds: float = Field(
        60.0, gt=0, description="S3: seconds to wait for an answer (a slow large upload answers within it)"
    )
    s3_retries: int = Field(
        3, ge=0, description="S3: tries again after a connection failure, a timeout or a 5xx answer"
    )
    s3_reader_access_key: str = Field(
        "wanfactory-reader",
        description="access key of the read-only S3 credential given to people, the website and reports: "
        "published outputs only, never quarantine/ (infra/access.py)",
    )
    s3_reader_secret_key: SecretStr = Field(
        SecretStr("wanfactory-reader-local-secret"),
        description="secret key of the read-only S3 credential (default: the local stack's development key)",
    )

    # Models.
    model_root: str = Field(
        "s3://wanfactory/models/tiny",
        description="folder or s3://bucket/prefix holding one diffusers folder per model "
        "(Wan2.2-T2V-A14B-Diffusers, Wan2.2-I2V-A14B-Diffusers, Wan2.2-TI2V-5B-Diffusers)",
    )
    model_variant: Literal["full", "tiny"] = Field(
        "tiny", description="'full' for real Wan2.2 weights; 'tiny' for the offline test models"
    )
    model_cache_dir: Path = Field(
        DEFAULT_STATE_DIR / "models", description="local cache for weights fetched from S3"
    )
    # Recipes and adapters (wan_engine/recipes.py, catalogs/adapters.toml).
    default_recipe: str = Field(
        "standard",
        description="sampling recipe for rows that name none, where their model has it (else 'standard'): "
        "'standard' (official steps and guidance) or 'lightx2v-4step' (A14B: 4 steps, no CFG, fused LoRA)",
    )
    adapter_registry: Path | None = Field(
        None, description="TOML registry of adapters (LoRAs) rows may name; unset: catalogs/adapters.toml"
    )
    adapter_root: str = Field(
        "s3://wanfactory/adapters/tiny",
        description="folder or s3://bucket/prefix the registry's relative adapter file paths are under",
    )
    adapter_slot_rank: int = Field(
        128,
        ge=1,
        le=1024,
        description="rank of the per-clip adapter slot each generator makes when its clips name adapters: "
        "the summed rank of one clip's adapters may not exceed it",
    )
    default_text_model: str = Field("t2v-a14b", description="model for catalog rows without model or image")
    default_image_model: str = Field("i2v-a14b", description="model for catalog rows with an image")
    device: str = Field("auto", description="'auto' (cuda when present), 'cuda' or 'cpu'")
    engine_attention_backend: str = Field(
        "auto",
        description="diffusers attention backend for the transformers: 'auto' (FlashAttention's Hopper/"
        "Blackwell kernels when flash_attn.cute is installed, else PyTorch SDPA), 'native', or any other "
        "diffusers backend name",
    )
    # Opt-in approximate engine modes (bench/README.md has their measured speed and drift). Off, the
    # engine is exact: stock diffusers' frames within bf16 tolerance. Manifests record the mode.
    engine_step_cache_interval: int = Field(
        1,
        ge=1,
        le=8,
        description="APPROXIMATE when > 1: TaylorSeer step caching, one full transformer pass every N steps",
    )
    engine_fp8_matmuls: bool = Field(
        False, description="APPROXIMATE: FP8 matmuls in the transformer blocks (Ada/Hopper GPUs, torchao)"
    )
    engine_weights_8bit: Literal["fp8", "int8"] | None = Field(
        None,
        description="APPROXIMATE: the transformer blocks' weights stored in 8 bits, computed in bf16: 'fp8' "
        "(Ada/Hopper) or 'int8' (any GPU, e.g. A10G); half the GPU and host memory (torchao)",
    )
    # Where the weights live: unset, the engine decides at load from the weights and the GPU's memory
    # (wan_engine.memory.plan_memory); set, it overrides that choice (README: "Which GPUs run what").
    engine_block_streaming: bool | None = Field(
        None,
        description="stream every expert's blocks through a ring of two from pinned host memory (24 GB GPUs)",
    )
    engine_expert_streaming: bool | None = Field(
        None, description="A14B's two experts share one expert's worth of GPU memory (48 GB GPUs)"
    )
    engine_text_encoder_offload: bool | None = Field(
        None, description="the text encoder lives in pinned host memory between clips"
    )
    engine_vae_tiling: bool | None = Field(
        None, description="the VAE decodes in tiles (less memory; frames blended across tile seams)"
    )

    # Post-production (tasks/postprod/profiles/default.toml documents the profiles' stages).
    postprocess_profile: str = Field(
        "standard", description="profile for rows that name none (catalog column postprocess_profile)"
    )
    postprocess_profiles_path: Path | None = Field(
        None, description="TOML file of named post-production profiles; unset: the packaged ones"
    )
    upload_retry_seconds: float = Field(
        600.0,
        ge=0,
        description="how long a finished clip waits out an outage of the object store before it fails",
    )
    postprocess_threads: int = Field(
        1, ge=1, description="threads per clip in post-production (clips in parallel use the other cores)"
    )
    local_image_roots: list[Path] = Field(
        default_factory=list,
        description="folders (JSON list) a catalog or sheet may name local images in; a local catalog's own "
        "folder always counts; s3:// images are not limited",
    )
    content_policy_path: Path | None = Field(
        None, description="prompt policy TOML (block lists per locale); unset: the packaged default"
    )
    content_locale: str = Field(
        "en",
        description="the prompt policy's default language (BCP 47): its rules apply to every row, "
        "besides the row's own locale's",
    )
    c2pa_cert_chain: Path | None = Field(
        None, description="PEM: the C2PA signer's certificate, then its CA's; unset: a development chain"
    )
    c2pa_private_key: Path | None = Field(None, description="PEM: the C2PA signer's private key")
    c2pa_trust_anchor: Path | None = Field(
        None, description="PEM: the root that verifiers trust (`wanfactory verify` uses it)"
    )

    # Ray fan-out.
    ray_address: str | None = Field(
        None, description="existing cluster (e.g. 'ray://head:10001' or 'auto'); unset starts a local Ray"
    )
    cpu_actors_per_model: int = Field(1, ge=1, description="generator actors per model when Ray sees no GPU")
    actor_num_cpus: float = Field(0.5, gt=0, description="CPUs reserved by each generator actor")
    finisher_num_cpus: float = Field(0.5, gt=0, description="CPUs reserved by each encode-and-upload task")
    # The watchdog for hung clips (tasks/watchdog.py).
    clip_deadline_factor: float = Field(
        3.0,
        ge=0,
        description="a clip that holds its GPU longer than this many times its estimated GPU-seconds (one "
        "H100, full-size model: wan_engine/cost.py), and longer than the floor, is stopped: its actor is "
        "restarted and the clip retried once, then failed as timed out; raise it on GPUs slower than an H100",
    )
    clip_deadline_floor_seconds: float = Field(
        120.0,
        gt=0,
        description="the shortest deadline of a clip on its GPU, whatever its estimate: room for a clip at a "
        "shape its actor did not warm up at, which compiles again (~40 s for A14B)",
    )
    ray_object_store_bytes: int = Field(
        1_000_000_000, description="object store size of a locally started Ray"
    )
    ray_metrics_export_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="where a locally started Ray serves its Prometheus metrics (/metrics), ours included; "
        "unset: a port Ray picks. Cluster nodes set theirs with `ray start --metrics-export-port`",
    )

    # Runs.
    catalog_uri: str = Field(
        "s3://wanfactory/catalogs/sample/catalog.parquet",
        description="the nightly run's catalog: a local Parquet path or s3://bucket/key",
    )
    link_expiry_hours: int = Field(
        24, ge=1, le=168, description="lifetime of the presigned clip links in the run's artifacts"
    )
    # Cost (tasks/cost.py).
    gpu_price_per_hour: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: dict(DEFAULT_GPU_PRICE_PER_HOUR),
        description='USD per GPU-hour by GPU type (a JSON object, e.g. {"H100": 2.5, "cpu": 0}): prices '
        "each clip's measured GPU-seconds; a type it lacks leaves those clips' cost unknown",
    )
    estimate_gpu_type: str = Field(
        "H100",
        description="the GPU type whose price is put on planned clips' estimated GPU-seconds (dry runs)",
    )
    clips_per_task: int = Field(
        64, ge=1, description="clips per Prefect render task (keeps task runs few for big catalogs)"
    )
    manifest_checkpoint_seconds: float = Field(
        60.0,
        ge=0,
        description="a run checkpoints its manifest (complete: false) after every render task and, within "
        "one, as a clip ends once this long has passed since the last checkpoint (0: after every clip)",
    )

    # Runs whose process died (flows/automations.py): Prefect's heartbeats and zombie automation.
    flow_heartbeat_seconds: int = Field(
        60,
        ge=30,
        description="seconds between a flow run's heartbeat events; the wanfactory commands pass it to "
        "Prefect as PREFECT_FLOWS_HEARTBEAT_FREQUENCY (Prefect's minimum is 30)",
    )
    zombie_window_seconds: int = Field(
        300,
        ge=10,
        description="a run of ours that sends no heartbeat (and ends in no final state) for this long is "
        "marked Crashed by the zombie automation; at least 1.5 x flow_heartbeat_seconds",
    )

    # Alerts (flows/automations.py): Prefect automations post to this webhook. A secret: Slack's and
    # Teams' webhook URLs carry their token.
    alert_webhook_url: SecretStr | None = Field(
        None,
        description="webhook the alerts are POSTed to (JSON: text, subject, body), e.g. a Slack, Teams or "
        "on-call incoming webhook; unset: no alert automations",
    )
    alert_infra_failure_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="a run alerts when more than this share of the clips it set out to make failed for the "
        "infrastructure (read where runs run: the worker, `wanfactory serve`)",
    )

    # Schedules (read by `wanfactory serve` when it registers its deployments; prefect.yaml has its own copy).
    nightly_cron: str = Field(
        "0 2 * * *", description="cron of the nightly catalog run (minute hour day month weekday)"
    )
    nightly_timezone: str = Field(
        "UTC", description="IANA time zone the nightly cron is read in, e.g. Europe/Berlin (DST-aware)"
    )
    intake_poll_seconds: int = Field(
        30, ge=1, description="how often the intake watcher looks for prompt sheets dropped into intake/"
    )

    # Local stack.
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="where the local stack keeps its data")
    prefect_port: int = Field(4200, description="port of the local Prefect server")
    ceph_mon_port: int = Field(6789, description="port of the local object store's monitor")

    @field_validator("alert_webhook_url", mode="before")
    @classmethod
    def _empty_url_is_none(cls, url: object) -> object:
        # Compose's `${WANFACTORY_ALERT_WEBHOOK_URL:-}` passes an unset URL as an empty one: no alerts.
        return None if url == "" else url

    @field_validator("alert_webhook_url")
    @classmethod
    def _webhook_is_http(cls, url: SecretStr | None) -> SecretStr | None:
        # A URL that cannot be POSTed to would only show as alerts that never come.
        if url is not None:
            parts = urlsplit(url.get_secret_value().strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("should be an http:// or https:// URL with a host")
        return url

    @field_validator("zombie_window_seconds")
    @classmethod
    def _window_outlasts_heartbeats(cls, window: int, info: ValidationInfo) -> int:
        heartbeat = info.data.get("flow_heartbeat_seconds")
        if heartbeat is not None and window < 1.5 * heartbeat:
            raise ValueError(
                f"must be at least 1.5 x WANFACTORY_FLOW_HEARTBEAT_SECONDS ({heartbeat}), or live runs "
                "whose heartbeat comes a little late would be marked Crashed"
            )
        return window

    def prefect_environment(self) -> dict[str, str]:
        """Prefect settings our flow runs need, as environment variables: set before Prefect is imported
        (it reads them then) in every process that runs a flow of ours."""
        return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(self.flow_heartbeat_seconds)}

    @property
    def manifest_spool_dir(self) -> Path:
        """Where manifests wait when the object store cannot take them."""
        return self.state_dir / "spool"

    def object_store(self) -> ObjectStoreConfig:
        return ObjectStoreConfig(
            endpoint=self.s3_endpoint,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key,
            bucket=self.s3_bucket,
            secure=self.s3_secure,
            region=self.s3_region,
            connect_timeout_s=self.s3_connect_timeout_seconds,
            read_timeout_s=self.s3_read_timeout_seconds,
            retries=self.s3_retries,
        )

    def reader_store(self) -> ObjectStoreConfig:
        """The reader's view of the bucket: the same endpoint with the read-only credential."""
        return replace(
            self.object_store(), access_key=self.s3_reader_access_key, secret_key=self.s3_reader_secret_key
        )
