"""The registries in configs/ (datasets.yaml, experiments.yaml): what loads, and the error for each
kind of mistake names the file, the entry and the field.

    .venv/bin/pytest -q tests/pipelines/test_registries.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusion.config import preset
from fusion.paths import PROJECT_ROOT
from pipelines.partitions import build_partitions
from pipelines.registries import RegistryError, load_datasets, load_experiments


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def datasets_file(tmp_path: Path, **entries) -> Path:
    return write(tmp_path / "datasets.yaml", {"datasets": entries})


def experiments_file(tmp_path: Path, experiments: dict, defaults: dict | None = None) -> Path:
    data = {"experiments": experiments}
    if defaults is not None:
        data["defaults"] = defaults
    return write(tmp_path / "experiments.yaml", data)


EXP = {"dataset": "shapes", "media_encoder": "img", "text_encoder": "txt"}


def test_the_real_registries_load():
    configs = PROJECT_ROOT / "configs"
    datasets = load_datasets(configs / "datasets.yaml")
    experiments = load_experiments(configs / "experiments.yaml")
    assert datasets and experiments
    for exp in experiments.values():
        assert exp.dataset in datasets


def test_dataset_entries_load_with_defaults(tmp_path):
    path = datasets_file(
        tmp_path,
        emoji={"modality": "image", "source": "emoji", "limit": 5},
        mine={"modality": "audio", "reader": "clotho", "root": "/data/clotho", "options": {"x": 1}},
    )
    ds = load_datasets(path)
    assert ds["emoji"].source == "emoji" and ds["emoji"].limit == 5 and ds["emoji"].seed == 0
    assert ds["mine"].reader == "clotho" and ds["mine"].root == "/data/clotho"
    assert ds["mine"].options == {"x": 1} and ds["mine"].name == "mine"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"modality": "image", "source": "emoji", "colour": "red"}, r"dataset 'bad'.*colour"),
        (
            {"modality": "video", "source": "emoji"},
            r"dataset 'bad': modality must be image or audio, got 'video'",
        ),
        (
            {"modality": "image", "source": "emoji", "reader": "manifest", "root": "/x"},
            r"dataset 'bad': give exactly one of source or reader",
        ),
        ({"modality": "image"}, r"dataset 'bad': give exactly one of source or reader"),
        ({"modality": "image", "reader": "manifest"}, r"dataset 'bad': a reader needs a root folder"),
        ({"source": "emoji"}, r"dataset 'bad'.*modality"),
        ("just a string", r"dataset 'bad' must be a mapping"),
    ],
    ids=[
        "unknown-field",
        "bad-modality",
        "source-and-reader",
        "neither",
        "reader-without-root",
        "no-modality",
        "not-a-mapping",
    ],
)
def test_dataset_errors_name_the_entry_and_the_field(tmp_path, entry, message):
    path = datasets_file(tmp_path, good={"modality": "image", "source": "emoji"}, bad=entry)
    with pytest.raises(RegistryError, match=message) as err:
        load_datasets(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"expected a non-empty mapping under 'datasets:'"),
        ("datasets: {}\n", r"expected a non-empty mapping under 'datasets:'"),
        ("datasets: [a, b]\n", r"expected a non-empty mapping under 'datasets:'"),
        ("experiments: {x: {}}\n", r"expected a non-empty mapping under 'datasets:'"),
    ],
)
def test_malformed_dataset_files(tmp_path, text, message):
    with pytest.raises(RegistryError, match=message):
        load_datasets(write(tmp_path / "datasets.yaml", text))


def test_missing_registry_file(tmp_path):
    with pytest.raises(RegistryError, match=r"nope\.yaml does not exist"):
        load_datasets(tmp_path / "nope.yaml")
    with pytest.raises(RegistryError, match=r"nope\.yaml does not exist"):
        load_experiments(tmp_path / "nope.yaml")


def test_registry_error_is_a_value_error():
    assert issubclass(RegistryError, ValueError)


def test_experiments_merge_preset_defaults_and_overrides(tmp_path):
    path = experiments_file(
        tmp_path,
        {
            "a": {**EXP, "train": {"epochs": 2}},
            "b": {
                **EXP,
                "family": "quantity",
                "select": {"strategy": "quantity", "n": 10},
                "fusemix": {"mode": "none"},
            },
        },
        defaults={"preset": "cpu-small", "train": {"epochs": 7, "batch_size": 32}, "adapter": {"depth": 1}},
    )
    exps = load_experiments(path)
    base = preset("cpu-small")
    # An experiment's own section adds to the defaults' section of the same name, field by field:
    # `train: {epochs: 2}` keeps the defaults' batch size (and the preset's other fields).
    assert exps["a"].train.epochs == 2
    assert exps["a"].train.batch_size == 32
    assert exps["a"].train.lr == base.train.lr
    assert exps["b"].train.epochs == 7 and exps["b"].train.batch_size == 32
    assert exps["a"].adapter.depth == exps["b"].adapter.depth == 1
    assert exps["b"].fusemix.mode == "none" and exps["a"].fusemix.mode == base.fusemix.mode
    assert exps["b"].select == {"strategy": "quantity", "n": 10}
    assert exps["a"].select == {"strategy": "all"} and exps["a"].caption == "clean"
    assert exps["a"].name == "a" and exps["b"].family == "quantity"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({**EXP, "colour": "red"}, r"experiment 'bad'.*colour"),
        ({"media_encoder": "img", "text_encoder": "txt"}, r"experiment 'bad'.*dataset"),
        ({**EXP, "preset": "huge"}, r"experiment 'bad'.*unknown preset 'huge'"),
        ({**EXP, "train": {"epoch": 3}}, r"experiment 'bad'.*unknown TrainConfig fields: \['epoch'\]"),
        ({**EXP, "fusemix": {"beta": 2}}, r"experiment 'bad'.*unknown FuseMixConfig fields: \['beta'\]"),
        ({**EXP, "adapter": {"width": 3}}, r"experiment 'bad'.*width"),
        ({**EXP, "caption": "dirty"}, r"experiment 'bad': caption must be clean or raw"),
        ({**EXP, "method": "svm"}, r"experiment 'bad': method must be one of adapters, asif, ridge"),
        ({**EXP, "seeds": 0}, r"experiment 'bad': seeds must be a whole number >= 1"),
        ({**EXP, "group_by": "colour"}, r"experiment 'bad': group_by must be one of"),
        ({**EXP, "hubness": "magic"}, r"experiment 'bad': hubness must be one of \('csls'"),
        ({**EXP, "train": {"loss": "hinge"}}, r"experiment 'bad'.*unknown loss 'hinge'"),
    ],
    ids=[
        "unknown-field",
        "missing-dataset",
        "unknown-preset",
        "train-typo",
        "fusemix-typo",
        "adapter-typo",
        "bad-caption",
        "bad-method",
        "no-seeds",
        "bad-group",
        "bad-hubness",
        "bad-loss",
    ],
)
def test_experiment_errors_name_the_entry_and_the_field(tmp_path, entry, message):
    path = experiments_file(tmp_path, {"good": EXP, "bad": entry})
    with pytest.raises(RegistryError, match=message) as err:
        load_experiments(path)
    assert str(path) in str(err.value)


def test_experiment_naming_an_undeclared_dataset_is_refused(tmp_path):
    datasets_file(tmp_path, shapes={"modality": "image", "source": "emoji"})
    experiments_file(tmp_path, {"ok": EXP, "orphan": {**EXP, "dataset": "missing"}})
    with pytest.raises(
        ValueError, match=r"experiment 'orphan' names dataset 'missing', which is not in datasets\.yaml"
    ):
        build_partitions(tmp_path)
