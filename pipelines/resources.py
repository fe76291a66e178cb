"""Dagster resources, one per external system: the Lance lake, MLflow tracking, the encoder bank
and the DuckDB catalog. Defaults put everything under one home folder (fusion.paths.fusemix_home()).
"""

from __future__ import annotations

import threading
from pathlib import Path

import dagster as dg
from pydantic import Field

from fusion.adapters import EncoderRef
from fusion.encoders import EncoderSpec, FrozenEncoder, build_encoder, describe_encoder, load_registry
from fusion.hardware import resolve_device
from fusion.paths import configs_dir, fusemix_home
from pipelines.lake import Lake, default_lake_root
from pipelines.tracking import default_artifact_root, default_tracking_uri


class LanceLake(dg.ConfigurableResource):
    """The Lance tables of the pipeline under one root URI."""

    root: str = Field(
        default_factory=default_lake_root,
        description="Local folder or s3:// / gs:// prefix (default: $FUSEMIX_LAKE, else <home>/lance)",
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="Lance object-store options over those taken from the environment (AWS_ENDPOINT_URL, "
        "AWS_REGION, AWS_ACCESS_KEY_ID, ...); pass secrets as dg.EnvVar, never literally",
    )

    def lake(self) -> Lake:
        return Lake(self.root, storage_options=self.storage_options or None)


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking: a SQLite store under the home folder by default, or a tracking server URI."""

    tracking_uri: str = Field(
        default_factory=default_tracking_uri, description="sqlite:///... or http://host:port"
    )
    artifact_root: str = Field(
        default_factory=default_artifact_root, description="Where new MLflow experiments keep their artifacts"
    )
    experiment_prefix: str = Field(default="fusemix", description="MLflow experiment name prefix")

    def client(self):
        import mlflow

        if self.tracking_uri.startswith("sqlite:///"):
            # SQLite creates the database file but not its folder.
            Path(self.tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        return mlflow.MlflowClient(tracking_uri=self.tracking_uri)

    def experiment_id(self, name: str) -> str:
        client = self.client()
        full = f"{self.experiment_prefix}/{name}"
        exp = client.get_experiment_by_name(full)
        if exp is not None:
            return exp.experiment_id
        location = (
            self.artifact_root if "://" in self.artifact_root else Path(self.artifact_root).resolve().as_uri()
        )
        return client.create_experiment(full, artifact_location=f"{location.rstrip('/')}/{name}")


_ENCODERS: dict[tuple, FrozenEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


class EncoderBank(dg.ConfigurableResource):
    """The frozen encoders of configs/encoders.yaml, built once per process and kept."""

    registry_path: str = Field(default_factory=lambda: str(configs_dir() / "encoders.yaml"))
    device: str = Field(
        default="",
        description="cpu, cuda, cuda:N, mps or auto; empty: $FUSEMIX_DEVICE, else cpu. An encoder's own "
        "`device` in encoders.yaml wins.",
    )
    cache_dir: str | None = Field(default=None, description="Model cache (offline pack, converted weights)")

    def specs(self) -> dict[str, EncoderSpec]:
        return load_registry(self.registry_path)

    def spec(self, name: str) -> EncoderSpec:
        specs = self.specs()
        if name not in specs:
            raise KeyError(f"encoder {name!r} is not in {self.registry_path}; known: {sorted(specs)}")
        return specs[name]

    def ray_options(self, spec: EncoderSpec, workers: int, address: str | None) -> dict:
        """The `ray` settings of pipelines.extract.extract_dataset for this encoder."""
        return {
            "workers": workers,
            "address": address or None,
            "device": self.device_for(spec),
            "cache_dir": self.cache_dir,
        }

    def device_for(self, spec: EncoderSpec) -> str:
        """The device an encoder runs on: its own `device`, else this bank's, else $FUSEMIX_DEVICE, else cpu."""
        return resolve_device(spec.device or self.device or None)

    def ref(self, name: str) -> EncoderRef:
        """What a checkpoint records of an encoder: name, fingerprint, dimension (weights not loaded)."""
        spec = self.spec(name)
        cache = Path(self.cache_dir) if self.cache_dir else None
        return describe_encoder(spec, cache_dir=cache, device=self.device_for(spec))

    def get(self, name: str) -> FrozenEncoder:
        spec = self.spec(name)
        device = self.device_for(spec)
        key = (spec, device, self.cache_dir)
        with _ENCODERS_LOCK:
            if key not in _ENCODERS:
                _ENCODERS[key] = build_encoder(
                    spec, device=device, cache_dir=Path(self.cache_dir) if self.cache_dir else None
                )
            return _ENCODERS[key]


class DuckDBCatalog(dg.ConfigurableResource):
    """SQL over the lake: every Lance table as a DuckDB view (see pipelines.catalog)."""

    lake: LanceLake
    database: str | None = Field(default=None, description="DuckDB file; in-memory when unset")

    def catalog(self):
        from pipelines.catalog import Catalog

        return Catalog(self.lake.lake(), self.database)


class PipelinePaths(dg.ConfigurableResource):
    """Where trained adapters and reports go, and which registries are read."""

    home: str = Field(default_factory=lambda: str(fusemix_home()))
    configs: str = Field(default_factory=lambda: str(configs_dir()))

    @property
    def models_dir(self) -> Path:
        return Path(self.home) / "models"

    @property
    def reports_dir(self) -> Path:
        return Path(self.home) / "reports"

    @property
    def data_cache(self) -> Path:
        path = Path(self.home) / "cache" / "data"
        path.mkdir(parents=True, exist_ok=True)
        return path
