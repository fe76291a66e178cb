"""The trainer's speed options: precision "auto" (per the CPU's bf16 units), torch.compile (close to
eager, or eager after one warning), and the fused optimizer (fp32 runs as before to float rounding).

No timing here: speed is measured by `python -m benchmarks.bench_train`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fusion import hardware
from fusion import trainer as trainer_mod
from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.config import AdapterConfig, FuseMixConfig, TrainConfig
from fusion.fusemix import mix_with_sources
from fusion.loss import clamp_temperature, clip_loss
from fusion.trainer import CompiledOrEager, lr_factor, param_groups, resolve_compile, train_adapters
from tests.fusion.test_trainer import _data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = AdapterConfig(depth=1, expansion=2, dropout=0.1, output_dim=8)
NO_DROPOUT = AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=8)

# The default TrainConfig's repr before the speed options: pipelines/train.py hashes it (inside
# repr(ExperimentSpec)), so a change here would retrain every checkpoint.
DEFAULT_REPR = (
    "TrainConfig(batch_size=1024, epochs=20, steps=None, lr=0.001, weight_decay=0.1, warmup_steps=100, "
    "schedule='cosine', min_lr_ratio=0.0, grad_clip=None, seed=0, device='cpu', precision='fp32', "
    "temperature_init=0.07, temperature_min=0.001, temperature_max=0.5, eval_every=None, "
    "val_batch_size=4096, loss='infonce')"
)


def _train(x, y, adapter=SMALL, mode="fusemix", **kw):
    cfg = dict(batch_size=16, steps=8, warmup_steps=2, seed=0)
    cfg.update(kw)
    return train_adapters(x, y, adapter, FuseMixConfig(mode), TrainConfig(**cfg))


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


@pytest.fixture
def flags(monkeypatch):
    """Sets the CPU flags that fusion.hardware reads."""

    def set_flags(*names: str) -> None:
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(names))

    return set_flags


# --- precision "auto" ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpu", "want"),
    [
        (("avx2", "amx_bf16", "amx_tile"), "bf16"),
        (("avx512f", "avx512_bf16"), "bf16"),
        (("avx2", "fma", "avx512f"), "fp32"),  # bf16 would be emulated, slower than fp32
        ((), "fp32"),  # no /proc/cpuinfo
    ],
)
def test_auto_precision_on_the_cpu_follows_its_bf16_units(flags, cpu, want):
    flags(*cpu)
    assert hardware.resolve_train_precision("auto", "cpu") == want


def test_explicit_precisions_pass_through_and_other_devices_get_fp32(flags):
    flags("amx_bf16")
    for p in ("fp32", "bf16", "fp16"):
        assert hardware.resolve_train_precision(p, "cpu") == p
    assert hardware.resolve_train_precision("auto", "mps") == "fp32"


@pytest.mark.parametrize(("bf16_gpu", "want"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_follows_the_gpu(monkeypatch, bf16_gpu, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    assert hardware.resolve_train_precision("auto", "cuda:0") == want


def test_auto_precision_trains_as_the_precision_it_resolves_to(flags):
    x, y = _data()
    flags("avx2")
    auto, fp32 = _train(x, y, precision="auto"), _train(x, y)
    assert auto.precision == fp32.precision == "fp32"
    assert _losses(auto) == _losses(fp32)
    flags("avx512_bf16")
    auto, bf16 = _train(x, y, precision="auto"), _train(x, y, precision="bf16")
    assert auto.precision == "bf16"
    assert _losses(auto) == _losses(bf16)


def test_bf16_training_on_the_cpu_stays_close_to_fp32():
    x, y = _data(n=256)
    fp32, bf16 = _train(x, y, steps=12), _train(x, y, steps=12, precision="bf16")
    assert bf16.precision == "bf16" and all(np.isfinite(_losses(bf16)))
    np.testing.assert_allclose(_losses(bf16), _losses(fp32), rtol=0.02)
    assert bf16.model.embed("x", x[:4]).dtype == torch.float32


# --- config -------------------------------------------------------------------------------------------


def test_the_default_repr_and_so_the_inputs_hash_is_unchanged():
    assert repr(TrainConfig()) == DEFAULT_REPR
    assert TrainConfig().precision == "fp32" and TrainConfig().compile is False
    assert "compile" not in repr(TrainConfig(compile=True))
    assert "precision='auto'" in repr(TrainConfig(precision="auto"))


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_compile_accepts_true_false_and_auto(value):
    assert TrainConfig(compile=value).compile == value


@pytest.mark.parametrize(("field", "value"), [("compile", "yes"), ("compile", 1), ("precision", "bf32")])
def test_bad_speed_options_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_compile_auto_means_a_compiler_is_present(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer_mod, "compiler_available", lambda device: False)
    assert resolve_compile("auto", cpu) is False and resolve_compile(True, cpu) is True
    monkeypatch.setattr(trainer_mod, "compiler_available", lambda device: True)
    assert resolve_compile("auto", cpu) is True and resolve_compile(False, cpu) is False


# --- torch.compile ------------------------------------------------------------------------------------


@pytest.fixture
def compile_without_cxx(monkeypatch):
    """torch.compile through TorchDynamo and AOTAutograd with eager kernels ("aot_eager"): the traced
    forward and backward of the real path, without the C++ build (tens of seconds) of inductor."""
    real = torch.compile

    def aot_eager(fn, **kwargs):
        return real(fn, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_matches_eager(compile_without_cxx):
    x, y = _data(n=100)  # 100 pairs in batches of 32: a partial last batch each epoch runs eagerly
    eager = _train(x, y, adapter=NO_DROPOUT, batch_size=16, steps=None, epochs=2)
    compiled = _train(x, y, adapter=NO_DROPOUT, batch_size=16, steps=None, epochs=2, compile=True)
    assert compiled.compiled and not eager.compiled
    assert len(_losses(compiled)) == len(_losses(eager)) == 8
    np.testing.assert_allclose(_losses(compiled), _losses(eager), rtol=1e-5, atol=1e-6)


def test_compiled_training_with_the_masked_loss_matches_eager(compile_without_cxx):
    x, y = _data()
    groups = (np.arange(len(x)) // 3)[:, None]  # three pairs share each key: the mask is not empty

    def run(compile: bool):
        cfg = TrainConfig(batch_size=16, steps=4, loss="masked", compile=compile)
        return train_adapters(x, y, NO_DROPOUT, FuseMixConfig(), cfg, groups=groups)

    eager, compiled = run(False), run(True)
    assert compiled.compiled
    np.testing.assert_allclose(_losses(compiled), _losses(eager), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    not trainer_mod.compiler_available(torch.device("cpu")), reason="no C++ compiler for torch.compile"
)
def test_inductor_compiled_training_matches_eager():
    """The real backend: C++ kernels built by inductor (20-50 s the first time on 2 cores)."""
    x, y = _data(n=256)
    eager = _train(x, y, adapter=NO_DROPOUT, batch_size=32, steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would hide a broken compile
        compiled = _train(x, y, adapter=NO_DROPOUT, batch_size=32, steps=10, compile=True)
    assert compiled.compiled
    np.testing.assert_allclose(_losses(compiled), _losses(eager), rtol=1e-5, atol=1e-5)


def _failing_compile_at_build(fn, **kwargs):
    raise RuntimeError("no C++ compiler found")


def _failing_compile_at_call(fn, **kwargs):
    def compiled(*args, **kw):
        raise RuntimeError("backend compiler failed: unsupported op")

    return compiled


@pytest.mark.parametrize("failing", [_failing_compile_at_build, _failing_compile_at_call])
def test_a_failing_compile_warns_once_and_trains_eagerly(monkeypatch, failing):
    x, y = _data()
    eager = _train(x, y)
    monkeypatch.setattr(torch, "compile", failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = _train(x, y, compile=True)
    compile_warnings = [w for w in caught if "torch.compile failed" in str(w.message)]
    assert len(compile_warnings) == 1 and issubclass(compile_warnings[0].category, RuntimeWarning)
    assert not fallback.compiled
    assert _losses(fallback) == _losses(eager)  # nothing ran compiled: the very same run


def test_compiled_or_eager_runs_other_shapes_eagerly(monkeypatch):
    calls = []

    def fake_compile(fn, **kwargs):
        def compiled(*args):
            calls.append("compiled")
            return fn(*args)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    runner = CompiledOrEager(lambda t: t * 2, enabled=True)
    body = lambda fn, t: fn(t)  # noqa: E731
    for n in (4, 4, 3, 4):
        assert torch.equal(runner.run(body, torch.ones(n)), torch.full((n,), 2.0))
    assert calls == ["compiled"] * 3 and runner.compiled


# --- the step's optimisations keep fp32 results ------------------------------------------------------


def _reference_losses(x, y, adapter_cfg, fusemix_cfg, cfg: TrainConfig) -> list[float]:
    """The plain eager step the trainer ran before its speed work: per-parameter AdamW, a host read
    of the loss and temperature, nothing fused or compiled. Same seed, same batches, same mixing."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = FusedModel(
        {"x": Adapter(x.shape[1], adapter_cfg), "y": Adapter(y.shape[1], adapter_cfg)},
        {"x": EncoderRef("x", "", x.shape[1]), "y": EncoderRef("y", "", y.shape[1])},
        temperature=cfg.temperature_init,
    )
    opt = torch.optim.AdamW(
        param_groups(model.adapters.values(), cfg.weight_decay)
        + [{"params": [model.temperature], "weight_decay": 0.0}],
        lr=cfg.lr,
        foreach=False,
        fused=False,
    )
    warmup = min(cfg.warmup_steps, cfg.steps // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, warmup, cfg.schedule))
    batch = 2 * cfg.batch_size if fusemix_cfg.mode in ("fusemix", "independent") else cfg.batch_size
    losses = []
    model.train()
    for bx, by in trainer_mod._batches(lambda: [(x, y)], batch, rng):
        xm, ym, _, _ = mix_with_sources(torch.from_numpy(bx), torch.from_numpy(by), fusemix_cfg, rng)
        t = clamp_temperature(model.temperature, cfg.temperature_min, cfg.temperature_max)
        loss = clip_loss(model.adapters["x"](xm), model.adapters["y"](ym), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.temperature.clamp_(cfg.temperature_min, cfg.temperature_max)
        losses.append(float(loss.detach()))
        if len(losses) == cfg.steps:
            break
    return losses


def test_the_fp32_step_gives_the_losses_of_the_plain_eager_step(monkeypatch):
    x, y = _data(n=400)
    cfg = TrainConfig(batch_size=16, steps=10, epochs=None, warmup_steps=3)
    want = _reference_losses(x, y, SMALL, FuseMixConfig(), cfg)
    fused = train_adapters(x, y, SMALL, FuseMixConfig(), cfg)
    # The fused AdamW kernel rounds differently from the loop: the same run to float rounding.
    np.testing.assert_allclose(_losses(fused), want, rtol=0, atol=1e-6)
    # Everything else in the step is unchanged: with the loop optimizer, bit for bit.
    monkeypatch.setattr(
        trainer_mod, "make_optimizer", lambda groups, lr, device: torch.optim.AdamW(groups, lr=lr)
    )
    assert _losses(train_adapters(x, y, SMALL, FuseMixConfig(), cfg)) == want


def test_the_optimizer_is_fused_on_the_cpu():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = trainer_mod.make_optimizer([{"params": [p]}], 1e-3, torch.device("cpu"))
    assert opt.defaults["fused"] is True
