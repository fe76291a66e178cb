"""Partitions of the asset graph, read from the registries in configs/.

dataset      ingest, one per entry of datasets.yaml
dataset x encoder   extract; the encoder dimension is dynamic: the encoder sensor adds a
             partition when an encoder appears in encoders.yaml
experiment   curate, train, evaluate, one per entry of experiments.yaml
family       the ablation report, one per family of experiments.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from fusion.encoders import EncoderSpec, load_registry
from pipelines.registries import DatasetSpec, ExperimentSpec, load_datasets, load_experiments

ENCODER_PARTITIONS = "encoder"


@dataclass(frozen=True)
class Partitions:
    configs: Path
    datasets: dict[str, DatasetSpec]
    experiments: dict[str, ExperimentSpec]
    dataset: dg.StaticPartitionsDefinition
    encoder: dg.DynamicPartitionsDefinition
    extract: dg.MultiPartitionsDefinition
    experiment: dg.StaticPartitionsDefinition
    family: dg.StaticPartitionsDefinition

    def encoders(self) -> dict[str, EncoderSpec]:
        """Read on every call: the sensor notices edits without a reload."""
        return load_registry(self.configs / "encoders.yaml")

    def applies(self, dataset: str, encoder: EncoderSpec) -> bool:
        """Text encoders encode every dataset's captions; media encoders only their own modality."""
        return encoder.modality == "text" or encoder.modality == self.datasets[dataset].modality

    def extract_key(self, dataset: str, encoder: str) -> dg.MultiPartitionKey:
        return dg.MultiPartitionKey({"dataset": dataset, "encoder": encoder})


def build_partitions(configs: Path) -> Partitions:
    datasets = load_datasets(configs / "datasets.yaml")
    experiments = load_experiments(configs / "experiments.yaml")
    for exp in experiments.values():
        for name in (exp.dataset, *exp.eval_datasets):
            if name not in datasets:
                raise ValueError(
                    f"experiment {exp.name!r} names dataset {name!r}, which is not in datasets.yaml"
                )
    dataset = dg.StaticPartitionsDefinition(sorted(datasets))
    encoder = dg.DynamicPartitionsDefinition(name=ENCODER_PARTITIONS)
    return Partitions(
        configs=configs,
        datasets=datasets,
        experiments=experiments,
        dataset=dataset,
        encoder=encoder,
        extract=dg.MultiPartitionsDefinition({"dataset": dataset, "encoder": encoder}),
        experiment=dg.StaticPartitionsDefinition(sorted(experiments)),
        family=dg.StaticPartitionsDefinition(sorted({e.family for e in experiments.values()})),
    )
