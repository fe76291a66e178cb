"""Adapters: the reference architecture (parameter count by hand), L2-normalised output, input checks,
and FusedModel.embed giving the same result in batches as in one shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fusion.adapters import Adapter, Dropout, EncoderRef, FusedModel, cpu_dropout
from fusion.config import AdapterConfig


def _hand_count(d: int, depth: int, expansion: int, out: int) -> int:
    ed = expansion * d
    block = 2 * d + (d * ed + ed) + (ed * d + d)  # LN(d) weight+bias, Linear(d, ed), Linear(ed, d)
    return depth * block + 2 * d + (d * out + out)  # final LN(d) + Linear(d, out)


@pytest.mark.parametrize(("d", "depth", "expansion", "out"), [(6, 2, 3, 5), (8, 0, 4, 4), (10, 4, 4, 7)])
def test_parameter_count_matches_hand_count(d, depth, expansion, out):
    a = Adapter(d, AdapterConfig(depth=depth, expansion=expansion, dropout=0.1, output_dim=out))
    assert a.num_parameters == _hand_count(d, depth, expansion, out)
    assert a.num_parameters == sum(p.numel() for p in a.parameters())


def test_block_structure_is_pre_ln_residual_mlp():
    a = Adapter(6, AdapterConfig(depth=2, expansion=3, dropout=0.25, output_dim=5))
    assert len(a.blocks) == 2
    blk = a.blocks[0]
    assert isinstance(blk.norm, nn.LayerNorm) and blk.norm.normalized_shape == (6,)
    assert (blk.fc1.in_features, blk.fc1.out_features) == (6, 18)
    assert isinstance(blk.act, nn.GELU)
    assert isinstance(blk.drop, nn.Dropout) and blk.drop.p == 0.25
    assert (blk.fc2.in_features, blk.fc2.out_features) == (18, 6)
    assert isinstance(a.norm, nn.LayerNorm) and a.norm.normalized_shape == (6,)
    assert (a.proj.in_features, a.proj.out_features) == (6, 5)


def test_forward_equals_the_reference_formula():
    torch.manual_seed(0)
    a = Adapter(6, AdapterConfig(depth=2, expansion=3, dropout=0.5, output_dim=5)).eval()
    x = torch.randn(4, 6)
    h = x
    for blk in a.blocks:
        h = h + blk.fc2(torch.nn.functional.gelu(blk.fc1(blk.norm(h))))
    ref = a.proj(a.norm(h))
    ref = ref / ref.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(a(x), ref)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.6, 0.9])
def test_cpu_dropout_drops_at_rate_p_and_keeps_the_expectation(p):
    torch.manual_seed(0)
    x = torch.arange(1, 400_001, dtype=torch.float32).reshape(400, 1000)
    y = cpu_dropout(x, p)
    dropped = y == 0
    rate = dropped.float().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 2**-16  # 4 standard errors
    levels = 2**15
    scale = levels / (levels - round(p * levels))
    torch.testing.assert_close(y[~dropped], x[~dropped] * scale)  # kept ones scaled, never altered
    # Each 15-bit lane is uniform: every bit of the mask's random lanes is set half the time.
    assert abs(cpu_dropout(torch.ones(1000, 1000), 0.5).mean().item() - 1.0) < 0.01


def test_cpu_dropout_edges_and_repeatability():
    x = torch.randn(37, 11)  # not a multiple of 4 elements: the last random word is cut
    assert cpu_dropout(x, 0.0) is x
    assert torch.count_nonzero(cpu_dropout(x, 1.0 - 2**-20)) == 0
    torch.manual_seed(3)
    a = cpu_dropout(x, 0.5)
    torch.manual_seed(3)
    b = cpu_dropout(x, 0.5)
    c = cpu_dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_dropout_module_uses_the_cpu_mask_only_when_training():
    d = Dropout(0.5)
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(5)
    y = d(x)
    torch.manual_seed(5)
    assert torch.equal(y, cpu_dropout(x, 0.5))
    y.sum().backward()  # the gradient flows through the kept elements, scaled like them
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0)
    assert torch.equal(d.eval()(x), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert d.train()(x.detach().bfloat16()).dtype == torch.bfloat16


def test_flops_per_example_counts_matmuls():
    d, depth, e, out = 6, 2, 3, 5
    a = Adapter(d, AdapterConfig(depth=depth, expansion=e, dropout=0.0, output_dim=out))
    assert a.flops_per_example() == 2 * (depth * (d * e * d + e * d * d) + d * out)


def test_output_is_l2_normalised_and_shaped():
    torch.manual_seed(1)
    a = Adapter(12, AdapterConfig(depth=2, expansion=2, dropout=0.5, output_dim=7))
    for mode in (a.train, a.eval):
        mode()
        out = a(torch.randn(9, 12) * 50)
        assert out.shape == (9, 7)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(9))


def test_wrong_input_dim_raises_value_error_naming_both():
    a = Adapter(12, AdapterConfig(depth=1, expansion=2, dropout=0.0, output_dim=4))
    with pytest.raises(ValueError, match=r"12.*11"):
        a(torch.randn(3, 11))
    with pytest.raises(ValueError, match="input_dim"):
        Adapter(0, AdapterConfig())


def _model(dx=10, dy=7, seed=0) -> FusedModel:
    torch.manual_seed(seed)
    cfg = AdapterConfig(depth=2, expansion=2, dropout=0.5, output_dim=6)
    return FusedModel(
        {"image": Adapter(dx, cfg), "text": Adapter(dy, cfg)},
        {"image": EncoderRef("img-enc", "fp-i", dx), "text": EncoderRef("txt-enc", "fp-t", dy)},
    )


def test_embed_in_batches_equals_one_shot_and_restores_training_mode():
    m = _model()
    m.train()
    lat = np.random.default_rng(0).standard_normal((37, 10)).astype(np.float32)
    one = m.embed("image", lat, batch_size=1000)
    for bs in (1, 5, 16):
        torch.testing.assert_close(m.embed("image", lat, batch_size=bs), one)
    assert m.adapters["image"].training  # embed runs in eval mode (no dropout) but restores the mode
    # eval mode: dropout off, so the same call twice agrees and matches the adapter in eval
    m.eval()
    torch.testing.assert_close(m.adapters["image"](torch.from_numpy(lat)), one)
    assert one.shape == (37, 6)


def test_embed_empty_and_unknown_side():
    m = _model()
    assert m.embed("text", np.zeros((0, 7), np.float32)).shape == (0, 6)
    with pytest.raises(KeyError, match="audio"):
        m.embed("audio", np.zeros((2, 7), np.float32))


def test_fused_model_checks_sides_and_dims():
    cfg = AdapterConfig(depth=1, expansion=1, dropout=0.0, output_dim=4)
    with pytest.raises(ValueError, match="same sides"):
        FusedModel({"a": Adapter(3, cfg)}, {"b": EncoderRef("e", "f", 3)})
    with pytest.raises(ValueError, match=r"3 != encoder dim 5"):
        FusedModel({"a": Adapter(3, cfg)}, {"a": EncoderRef("e", "f", 5)})


def test_temperature_is_a_learnable_scalar():
    m = _model()
    assert m.temperature.requires_grad and m.temperature.ndim == 0
    assert float(m.temperature.detach()) == pytest.approx(0.07)
