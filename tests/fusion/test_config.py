"""Config validation: bad values give ValueErrors that name the field, unknown keys are rejected, and
the named presets build and round-trip through dicts."""

from __future__ import annotations

import pytest

from fusion.config import (
    PRESETS,
    AdapterConfig,
    FuseMixConfig,
    Preset,
    TrainConfig,
    from_dict,
    preset,
    to_dict,
)


@pytest.mark.parametrize(
    ("cls", "kwargs", "words"),
    [
        (AdapterConfig, {"depth": -1}, "depth"),
        (AdapterConfig, {"expansion": 0}, "expansion"),
        (AdapterConfig, {"dropout": 1.0}, "dropout"),
        (AdapterConfig, {"dropout": -0.1}, "dropout"),
        (AdapterConfig, {"output_dim": 0}, "output_dim"),
        (FuseMixConfig, {"mode": "mixup"}, "mode"),
        (FuseMixConfig, {"alpha": 0.0}, "alpha"),
        (FuseMixConfig, {"lambda_per": "item"}, "lambda_per"),
        (TrainConfig, {"batch_size": 1}, "batch_size"),
        (TrainConfig, {"epochs": None, "steps": None}, "epochs or steps"),
        (TrainConfig, {"steps": 0}, "steps"),
        (TrainConfig, {"epochs": 0}, "epochs"),
        (TrainConfig, {"lr": 0.0}, "lr"),
        (TrainConfig, {"precision": "int8"}, "precision"),
        (TrainConfig, {"schedule": "linear"}, "schedule"),
        (TrainConfig, {"temperature_init": 0.9}, "temperature"),
        (TrainConfig, {"temperature_min": 0.0}, "temperature"),
        (TrainConfig, {"warmup_steps": -1}, "warmup_steps"),
        (TrainConfig, {"weight_decay": -0.1}, "weight_decay"),
        (TrainConfig, {"min_lr_ratio": 1.5}, "min_lr_ratio"),
        (TrainConfig, {"grad_clip": 0.0}, "grad_clip"),
        (TrainConfig, {"eval_every": 0}, "eval_every"),
        (TrainConfig, {"val_batch_size": 1}, "val_batch_size"),
        (TrainConfig, {"loss": "supcon"}, "loss"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(cls, kwargs, words):
    with pytest.raises(ValueError, match=words):
        cls(**kwargs)


def test_bad_value_message_shows_the_value():
    with pytest.raises(ValueError, match="'mixup'"):
        FuseMixConfig(mode="mixup")
    with pytest.raises(ValueError, match="got -3"):
        AdapterConfig(depth=-3)


def test_defaults_are_the_reference_adapter():
    cfg = AdapterConfig()
    assert (cfg.depth, cfg.expansion, cfg.dropout, cfg.output_dim) == (4, 4, 0.6, 512)
    assert FuseMixConfig() == FuseMixConfig("fusemix", 1.0, "pair")
    t = TrainConfig()
    assert (t.temperature_init, t.temperature_min, t.temperature_max) == (0.07, 0.001, 0.5)


def test_loss_defaults_to_plain_infonce_and_names_the_choices():
    assert TrainConfig().loss == "infonce"
    assert all(PRESETS[name].train.loss == "infonce" for name in PRESETS)
    for loss in ("infonce", "masked", "multi"):
        assert TrainConfig(loss=loss).loss == loss
        assert from_dict(TrainConfig, {"loss": loss}).loss == loss
    with pytest.raises(ValueError, match="unknown loss 'supcon'; use infonce, masked or multi"):
        from_dict(TrainConfig, {"loss": "supcon"})


def test_configs_are_frozen():
    cfg = AdapterConfig()
    with pytest.raises(AttributeError):
        cfg.depth = 2  # type: ignore[misc]


@pytest.mark.parametrize("cls", [AdapterConfig, FuseMixConfig, TrainConfig])
def test_dict_round_trip(cls):
    cfg = cls()
    assert from_dict(cls, to_dict(cfg)) == cfg


def test_from_dict_rejects_unknown_keys_naming_them_and_the_known_ones():
    with pytest.raises(ValueError, match="unknown AdapterConfig fields") as err:
        from_dict(AdapterConfig, {"depth": 2, "widht": 3})
    assert "widht" in str(err.value)
    assert "expansion" in str(err.value)  # the known names help spot the typo


def test_from_dict_still_validates_values():
    with pytest.raises(ValueError, match="depth"):
        from_dict(AdapterConfig, {"depth": -1})


def test_from_dict_partial_keeps_defaults():
    cfg = from_dict(TrainConfig, {"lr": 3e-4, "steps": 10})
    assert cfg.lr == 3e-4 and cfg.steps == 10 and cfg.batch_size == TrainConfig().batch_size


def test_presets():
    assert {"reference", "cpu-small"} <= set(PRESETS)
    ref = preset("reference")
    assert isinstance(ref, Preset)
    assert ref.adapter == AdapterConfig(depth=4, expansion=4, dropout=0.6, output_dim=512)
    assert ref.fusemix.mode == "fusemix" and ref.fusemix.alpha == 1.0
    assert ref.train.batch_size == 40960 and ref.train.lr == 1e-3 and ref.train.weight_decay == 0.1
    assert ref.train.warmup_steps == 100 and ref.train.precision == "fp32"
    small = preset("cpu-small")
    assert small.train.batch_size < ref.train.batch_size
    assert small.adapter.output_dim <= ref.adapter.output_dim


def test_preset_overrides_touch_only_train_and_do_not_leak():
    p = preset("cpu-small", steps=7, seed=3)
    assert p.train.steps == 7 and p.train.seed == 3
    assert p.adapter == PRESETS["cpu-small"].adapter
    assert PRESETS["cpu-small"].train.steps is None  # the registry itself is unchanged
    with pytest.raises(TypeError):
        preset("cpu-small", no_such_knob=1)
    with pytest.raises(ValueError, match="lr"):
        preset("cpu-small", lr=-1.0)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="cpu-small"):
        preset("huge")


def test_cpu_full_is_cpu_small_with_batches_of_512():
    from dataclasses import replace

    small, full = preset("cpu-small"), preset("cpu-full")
    assert full.adapter == small.adapter and full.fusemix == small.fusemix
    assert full.train == replace(small.train, batch_size=512)


def test_the_projects_experiments_resolve_their_preset_batch():
    from pipelines.registries import load_experiments

    specs = load_experiments()  # configs/experiments.yaml: the default is cpu, the batch by data size
    assert specs["emoji-fusemix"].train == preset("cpu").train
    assert specs["sel-default"].train == specs["base-fusemix"].train == preset("cpu-small").train
    assert specs["sel-batch512"].train == preset("cpu-full").train


@pytest.mark.parametrize(
    ("n", "batch"),
    [(1, 128), (1_800, 128), (8_191, 128), (8_192, 256), (16_383, 256), (16_384, 512), (17_374, 512),
     (32_767, 512), (32_768, 1024), (10**7, 1024)],
)  # fmt: skip
def test_auto_batch_is_the_largest_power_of_two_at_most_n_over_32_within_128_and_1024(n, batch):
    from fusion.config import auto_batch_size

    assert auto_batch_size(n) == batch
    assert TrainConfig(batch_size="auto").batch_for(n) == batch
    assert TrainConfig(batch_size=300).batch_for(n) == 300  # a number is kept whatever the data


def test_auto_batch_needs_pairs_and_batch_size_takes_only_numbers_or_auto():
    from fusion.config import auto_batch_size

    with pytest.raises(ValueError, match="at least one"):
        auto_batch_size(0)
    for bad in ("big", True, 1, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            TrainConfig(batch_size=bad)


def test_cpu_preset_is_cpu_small_at_demo_size_and_cpu_full_on_the_full_emoji_set():
    from dataclasses import replace

    cpu, small, full = preset("cpu"), preset("cpu-small"), preset("cpu-full")
    assert cpu.adapter == small.adapter == full.adapter and cpu.fusemix == small.fusemix
    assert cpu.train == replace(small.train, batch_size="auto")
    assert cpu.train.batch_for(1_800) == small.train.batch_size
    assert cpu.train.batch_for(17_374) == full.train.batch_size
