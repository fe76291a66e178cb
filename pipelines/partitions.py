"""Partitions of the asset graph, read from the registries in configs/.

dataset      ingest, one per entry of datasets.yaml
dataset x encoder   extract
experiment   curate, train, evaluate, one per entry of experiments.yaml
family       the ablation report, one per family of experiments.yaml

Every dimension is dynamic: `partition_requests` compares the instance's partitions with the YAML
files and says what to add and remove (the registry sensor applies it on each tick, the command line
before each run), so an entry added to or removed from a YAML file shows up without a reload. The
registries themselves are read again whenever their file changes (`Partitions.datasets`,
`.experiments`, `.encoders()`). Encoders are only ever added: an encoder removed from encoders.yaml
keeps its partition, and its latents, until deleted by hand.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg

from fusion.encoders import EncoderSpec, load_registry
from pipelines.registries import DatasetSpec, ExperimentSpec, load_datasets, load_experiments

DATASET_PARTITIONS = "dataset"
ENCODER_PARTITIONS = "encoder"
EXPERIMENT_PARTITIONS = "experiment"
FAMILY_PARTITIONS = "family"


class UnknownPartition(dg.Failure):
    """A partition whose entry left the YAML file (the registry sensor removes it on its next tick)."""


@dataclass
class _Cached:
    """One registry file, parsed again only when its size or modification time changes."""

    path: Path
    load: Callable[[Path], Any]
    stamp: tuple[int, int] | None = None
    value: Any = None

    def get(self) -> Any:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self.stamp:
            self.value, self.stamp = self.load(self.path), stamp
        return self.value


def _check_datasets(experiments: dict[str, ExperimentSpec], datasets: dict[str, DatasetSpec]) -> None:
    for exp in experiments.values():
        for name in (exp.dataset, *exp.eval_datasets):
            if name not in datasets:
                raise ValueError(
                    f"experiment {exp.name!r} names dataset {name!r}, which is not in datasets.yaml"
                )


@dataclass(frozen=True)
class Partitions:
    configs: Path
    dataset: dg.DynamicPartitionsDefinition
    encoder: dg.DynamicPartitionsDefinition
    extract: dg.MultiPartitionsDefinition
    experiment: dg.DynamicPartitionsDefinition
    family: dg.DynamicPartitionsDefinition
    _files: dict[str, _Cached] = field(default_factory=dict, repr=False, compare=False)

    def _registry(self, name: str, load: Callable[[Path], Any]) -> Any:
        if name not in self._files:
            self._files[name] = _Cached(self.configs / name, load)
        return self._files[name].get()

    @property
    def datasets(self) -> dict[str, DatasetSpec]:
        """datasets.yaml as it is now."""
        return self._registry("datasets.yaml", load_datasets)

    @property
    def experiments(self) -> dict[str, ExperimentSpec]:
        """experiments.yaml as it is now (every dataset it names must be in datasets.yaml)."""
        experiments = self._registry("experiments.yaml", load_experiments)
        _check_datasets(experiments, self.datasets)
        return experiments

    def families(self) -> list[str]:
        return sorted({e.family for e in self.experiments.values()})

    def encoders(self) -> dict[str, EncoderSpec]:
        """encoders.yaml as it is now: the sensor notices edits without a reload."""
        return self._registry("encoders.yaml", load_registry)

    def dataset_spec(self, name: str) -> DatasetSpec:
        datasets = self.datasets
        if name not in datasets:
            raise UnknownPartition(f"dataset {name!r} is no longer in {self.configs / 'datasets.yaml'}")
        return datasets[name]

    def experiment_spec(self, name: str) -> ExperimentSpec:
        experiments = self.experiments
        if name not in experiments:
            raise UnknownPartition(f"experiment {name!r} is no longer in {self.configs / 'experiments.yaml'}")
        return experiments[name]

    def applies(self, dataset: str, encoder: EncoderSpec) -> bool:
        """Text encoders encode every dataset's captions; media encoders only their own modality."""
        return encoder.modality == "text" or encoder.modality == self.dataset_spec(dataset).modality

    def not_applicable(self, dataset: str, encoder: EncoderSpec) -> str | None:
        """Why `encoder` has nothing to extract from `dataset`, or None when it applies."""
        if self.applies(dataset, encoder):
            return None
        return (
            f"encoder {encoder.name} ({encoder.modality}) does not apply to dataset {dataset} "
            f"({self.dataset_spec(dataset).modality} + text); nothing to extract"
        )

    def extract_key(self, dataset: str, encoder: str) -> dg.MultiPartitionKey:
        return dg.MultiPartitionKey({"dataset": dataset, "encoder": encoder})

    def wanted(self) -> dict[str, list[str]]:
        """Partition keys per dimension that the YAML files ask for now."""
        return {
            DATASET_PARTITIONS: sorted(self.datasets),
            ENCODER_PARTITIONS: sorted(self.encoders()),
            EXPERIMENT_PARTITIONS: sorted(self.experiments),
            FAMILY_PARTITIONS: self.families(),
        }

    def partition_requests(
        self, instance: dg.DagsterInstance
    ) -> list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest]:
        """What to add to (and, but for encoders, remove from) the instance's partitions so that they
        match the YAML files; empty when they already do."""
        requests: list = []
        for dim, keys in self.wanted().items():
            known = set(instance.get_dynamic_partitions(dim))
            new = [k for k in keys if k not in known]
            gone = sorted(known - set(keys)) if dim != ENCODER_PARTITIONS else []
            if new:
                requests.append(dg.AddDynamicPartitionsRequest(dim, new))
            if gone:
                requests.append(dg.DeleteDynamicPartitionsRequest(dim, gone))
        return requests


def apply_partition_requests(instance: dg.DagsterInstance, requests) -> None:
    for req in requests:
        if isinstance(req, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        else:
            for key in req.partition_keys:
                instance.delete_dynamic_partition(req.partitions_def_name, key)


def sync_partitions(parts: Partitions, instance: dg.DagsterInstance) -> list:
    """Brings the instance's partitions in step with the YAML files (what the registry sensor does on
    each tick); returns the requests applied."""
    requests = parts.partition_requests(instance)
    apply_partition_requests(instance, requests)
    return requests


def build_partitions(configs: Path) -> Partitions:
    dataset = dg.DynamicPartitionsDefinition(name=DATASET_PARTITIONS)
    encoder = dg.DynamicPartitionsDefinition(name=ENCODER_PARTITIONS)
    parts = Partitions(
        configs=configs,
        dataset=dataset,
        encoder=encoder,
        extract=dg.MultiPartitionsDefinition({"dataset": dataset, "encoder": encoder}),
        experiment=dg.DynamicPartitionsDefinition(name=EXPERIMENT_PARTITIONS),
        family=dg.DynamicPartitionsDefinition(name=FAMILY_PARTITIONS),
    )
    parts.experiments  # noqa: B018 - a broken registry fails at load, with its message
    return parts
