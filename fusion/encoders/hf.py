"""Frozen encoders over transformers checkpoints (a local folder or a hub id), plus plain torch image modules.

- HFTextEncoder: AutoModel + AutoTokenizer, mean pooling over the attention mask, CLS or pooler output.
  A sentence-transformers `1_Pooling/config.json` in the folder decides the pooling (the model was
  trained with it) and `sentence_bert_config.json` the maximum length.
- HFImageEncoder: ViT/DINOv2-style AutoModel; CLS (last_hidden_state[:, 0]), pooler_output or a mean
  over tokens. Preprocessing through the folder's image processor (PIL backend) when it has one, else
  the spec's image_size/mean/std with PIL + numpy (resize the short side, centre crop).
- TorchImageEncoder: any torch module mapping normalised [B, 3, H, W] to [B, D] (EfficientNet-Lite from
  the offline pack) with the same PIL + numpy preprocessing.
- WhisperAudioEncoder: the encoder of a Whisper checkpoint, mean over the frames that hold real audio
  (one frame per 320 samples at 16 kHz). `options.short_clip` runs the encoder on the clip's own length
  instead of the 30-s window: transformers' WhisperEncoder.forward insists on 3000 mel frames, so the
  short path calls the convolutions and layers itself with a sliced positional embedding and a key
  mask, which also makes a padded batch give the same latents as one clip at a time.
- ClapEncoder: transformers ClapModel, audio or text tower (`options.tower`), raw projection output
  (the model's get_*_features would L2-normalise it; latents stay raw here).

Build these through fusion.encoders.build_encoder; `build_from_dir` is the shared path that the
offline pack also uses. Each class's `resolve(spec, model_dir)` works out the output dimension and the
effective settings (pooling, max_length, image size/mean/std, short_clip, tower) from the spec and the
folder's config files alone; the constructor uses it, and `resolve_from_dir` (behind
fusion.encoders.describe_encoder) calls it without loading the model, so both agree on the fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion.encoders.base import (
    EncoderConfigError,
    EncoderSpec,
    EncoderUnavailable,
    FrozenEncoder,
    ResolvedSettings,
    compute_fingerprint,
    hash_model_dir,
    resolve_precision,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Additive mask value that is finite in float16, bfloat16 and float32, so the mask survives autocast.
_MASK_VALUE = float(torch.finfo(torch.float16).min)


# ------------------------------------------------------------------------------------------ helpers


def _media():
    # Imported lazily so that `import fusion.encoders` stays cheap (no PIL/soundfile until decoding).
    from fusion import media

    return media


def _not_text(payload: Any, media_id: str) -> Exception:
    media = _media()
    return media.MediaError(
        media_id, "undecodable", f"a text encoder takes str, got {type(payload).__name__}"
    )


def looks_like_path(model: str) -> bool:
    """True for absolute, home- or dot-relative paths and existing paths; hub ids are "org/name" or "name"."""
    return model.startswith(("/", "~", ".")) or os.sep + os.sep in model or Path(model).expanduser().exists()


def resolve_model_dir(model: str, cache_dir: Path | None = None) -> Path:
    """A local folder for `model`: the folder itself, or the hub snapshot (downloaded when the network
    and HF_HUB_OFFLINE allow, else taken from the local hub cache). Raises EncoderUnavailable."""
    path = Path(model).expanduser()
    if looks_like_path(model):
        if not path.is_dir():
            raise EncoderUnavailable(f"model folder {path} does not exist")
        if not (path / "config.json").is_file():
            raise EncoderUnavailable(f"{path} is not a transformers model folder (no config.json)")
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on huggingface_hub
        raise EncoderUnavailable("huggingface_hub is not installed, so hub ids cannot be resolved") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        return Path(
            snapshot_download(
                model,
                cache_dir=str(cache_dir) if cache_dir else None,
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*"],
            )
        )
    except Exception as exc:  # hub errors come in many classes; all mean "not obtainable here"
        why = "HF_HUB_OFFLINE=1 and it is not in the local hub cache" if offline else "the hub is unreachable"
        raise EncoderUnavailable(
            f"model {model!r} is neither a local folder nor obtainable from the hub: {why} ({exc.__class__.__name__})"
        ) from exc


def read_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EncoderUnavailable(f"cannot read {model_dir / 'config.json'}: {exc}") from exc


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EncoderUnavailable(f"cannot read {path}: {exc}") from exc


def _autocast(device: str, precision: str):
    """Autocast of the forward pass to `precision` (base.resolve_precision's answer) on its device type."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, precision))


def _fp32():
    """Feature extraction (mel spectrograms) stays float32 inside an autocast forward."""
    return torch.autocast("cpu", enabled=False)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float32, copy=False)


def _freeze(model: torch.nn.Module, device: str) -> torch.nn.Module:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where mask is 1. hidden [B, T, D], mask [B, T] (0/1) -> [B, D]."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@contextlib.contextmanager
def _quiet_loading():
    """Hides transformers' per-load "Loading weights" bar (the extraction bar is the one that matters)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_auto(kind: str, model_dir: Path, **kwargs):
    """transformers.<kind>.from_pretrained; models pass use_safetensors=True because nothing is
    unpickled from disk (a folder with only pytorch_model.bin is reported as unavailable)."""
    import transformers

    cls = getattr(transformers, kind)
    try:
        with _quiet_loading():
            return cls.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise EncoderUnavailable(f"cannot load {kind} from {model_dir}: {exc}") from exc


class _TorchEncoder(FrozenEncoder):
    """Shared plumbing: device, autocast, inference mode."""

    def __init__(self, spec: EncoderSpec, device: str) -> None:
        self.spec = spec
        self.device = device
        self.precision = resolve_precision(spec.dtype, device)

    def _run(self, fn, *args, **kwargs) -> np.ndarray:
        with torch.inference_mode(), _autocast(self.device, self.precision):
            return _to_numpy(fn(*args, **kwargs))


# ------------------------------------------------------------------------------------------------ text


def sentence_transformers_settings(model_dir: Path) -> dict[str, Any]:
    """Pooling and max length that a sentence-transformers folder declares ({} when none)."""
    out: dict[str, Any] = {}
    pooling_cfg = model_dir / "1_Pooling" / "config.json"
    if pooling_cfg.is_file():
        cfg = json.loads(pooling_cfg.read_text(encoding="utf-8"))
        if cfg.get("pooling_mode_cls_token"):
            out["pooling"] = "cls"
        elif cfg.get("pooling_mode_mean_tokens"):
            out["pooling"] = "mean"
        else:
            modes = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v)
            raise EncoderUnavailable(
                f"{pooling_cfg} asks for pooling {modes}; only CLS and mean are supported"
            )
    st_cfg = model_dir / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_len = json.loads(st_cfg.read_text(encoding="utf-8")).get("max_seq_length")
        if max_len:
            out["max_length"] = int(max_len)
    return out


def tokenizer_model_max_length(model_dir: Path) -> Any:
    """The `model_max_length` the folder's tokenizer gets, read from tokenizer_config.json as
    transformers does (`model_max_length`, else the legacy `max_len`); None when it declares none
    (the tokenizer then holds a huge sentinel that counts as no limit)."""
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    cfg = _read_json(path)
    return cfg["model_max_length"] if "model_max_length" in cfg else cfg.get("max_len")


def _text_max_length(spec: EncoderSpec, tokenizer_limit: Any, config: dict, declared: int | None) -> int:
    if spec.preprocessing.get("max_length"):
        return int(spec.preprocessing["max_length"])
    if declared:
        return declared
    limits = [tokenizer_limit, config.get("max_position_embeddings")]
    # RoBERTa-style models reserve 2 positions for the padding offset.
    if config.get("model_type") in ("roberta", "xlm-roberta", "mpnet", "camembert") and limits[1]:
        limits[1] -= 2
    usable = [int(x) for x in limits if isinstance(x, int) and 0 < x < 100_000]
    return min(usable + [512])


@dataclass(frozen=True)
class TextSettings(ResolvedSettings):
    pooling: str
    max_length: int

    def effective(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "max_length": self.max_length}


class HFTextEncoder(_TorchEncoder):
    """Text -> [B, hidden] through AutoModel with mean/CLS/pooler pooling."""

    @classmethod
    def resolve(cls, spec: EncoderSpec, model_dir: Path) -> TextSettings:
        """Pooling (a sentence-transformers config wins over the spec), max length and hidden size."""
        config = read_config(model_dir)
        st = sentence_transformers_settings(model_dir)
        hidden = config.get("hidden_size") or config.get("d_model") or config.get("dim")
        if not isinstance(hidden, int):
            raise EncoderUnavailable(f"{model_dir}: config.json does not say the hidden size")
        max_length = _text_max_length(
            spec, tokenizer_model_max_length(model_dir), config, st.get("max_length")
        )
        return TextSettings(dim=hidden, pooling=st.get("pooling", spec.pooling), max_length=max_length)

    def __init__(self, spec: EncoderSpec, model_dir: Path, weights_sha256: str, device: str = "cpu") -> None:
        super().__init__(spec, device)
        self.settings = self.resolve(spec, model_dir)
        self.pooling = self.settings.pooling
        self.max_length = self.settings.max_length
        self.tokenizer = _load_auto("AutoTokenizer", model_dir)
        self.model = _freeze(_load_auto("AutoModel", model_dir, use_safetensors=True), device)
        self.dim = self.settings.dim
        self.fingerprint = self.settings.fingerprint(weights_sha256, spec, device)

    def prepare(self, payload: Any, media_id: str = "") -> str:
        if not isinstance(payload, str):
            raise _not_text(payload, media_id)
        return payload

    def cost(self, payload: Any) -> int:
        if not isinstance(payload, str):
            return 1
        ids = self.tokenizer(payload, truncation=True, max_length=self.max_length)["input_ids"]
        return len(ids)

    def _pool(self, out, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            return masked_mean(out.last_hidden_state, mask)
        if self.pooling == "cls":
            return out.last_hidden_state[:, 0]
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise EncoderConfigError(
                f"encoder {self.spec.name!r}: pooling 'pooler' but the model has no pooler"
            )
        return pooled

    def forward(self, prepared: list[str]) -> np.ndarray:
        """list of B strings -> float32 [B, dim]."""
        enc = self.tokenizer(
            list(prepared), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)

        def run():
            return self._pool(self.model(**enc), enc["attention_mask"])

        return self._run(run)


# ----------------------------------------------------------------------------------------------- image


def pil_preprocess(image, size: int, mean, std) -> np.ndarray:
    """RGB PIL image -> float32 [3, size, size]: short side resized to `size` (bicubic), centre crop,
    scaled to [0, 1] and normalised with per-channel mean/std."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


class _ImageEncoder(_TorchEncoder):
    """Decoding and stacking shared by the image encoders; subclasses set `_to_array` and `_features`."""

    sorts_by_cost = False

    def prepare(self, payload: Any, media_id: str = "") -> np.ndarray:
        from PIL import Image

        if isinstance(payload, np.ndarray):
            if payload.ndim != 3 or payload.shape[0] != 3:
                raise _media().MediaError(media_id, "undecodable", f"expected [3, H, W], got {payload.shape}")
            return payload.astype(np.float32, copy=False)
        image = (
            payload.convert("RGB")
            if isinstance(payload, Image.Image)
            else _media().decode_image(payload, media_id)
        )
        # Preprocess here, per item: a window of full-size decoded pictures would not fit in memory.
        return self._to_array(image)

    def forward(self, prepared: list[np.ndarray]) -> np.ndarray:
        """list of B float32 [3, H, W] -> float32 [B, dim]."""
        x = torch.from_numpy(np.stack(prepared)).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        return self._run(self._features, x)


@dataclass(frozen=True)
class ImageSettings(ResolvedSettings):
    """Either the folder's image processor config (`processor`, used as is) or size/mean/std for
    pil_preprocess (`processor` None)."""

    processor: Mapping | None
    size: int | None
    mean: tuple | None
    std: tuple | None
    # The module's BatchNorms are folded into its convolutions (efficientnet_lite.fold_for_inference).
    # In float32 that matches the unfolded network to rounding, so the fingerprint stays; in reduced
    # precision the latents move (cosine about 0.996 to the unfolded bf16 ones), so it enters it.
    folded: bool = False

    def effective(self) -> dict[str, Any]:
        if self.processor is not None:
            return {"processor": self.processor}
        return {"image_size": self.size, "mean": self.mean, "std": self.std}

    def fingerprint(self, weights_sha256: str, spec: EncoderSpec, device: str = "cpu") -> str:
        precision = self.precision(spec, device)
        folded = {"folded_batchnorm": True} if self.folded and precision != "float32" else {}
        return compute_fingerprint(weights_sha256, spec, precision, **self.effective(), **folded)


class HFImageEncoder(_ImageEncoder):
    """Image -> [B, hidden] through a ViT/DINOv2-style AutoModel."""

    @classmethod
    def resolve(cls, spec: EncoderSpec, model_dir: Path) -> ImageSettings:
        """The folder's processor config unless the spec sets image_size/mean/std, and the hidden size."""
        config = read_config(model_dir)
        hidden = config.get("hidden_size")
        if isinstance(hidden, list):  # conv nets list one size per stage; the last one is the output
            hidden = hidden[-1]
        if not isinstance(hidden, int):
            raise EncoderUnavailable(f"{model_dir}: config.json does not say the hidden size")
        processor_cfg = model_dir / "preprocessor_config.json"
        if processor_cfg.is_file() and not _wants_own_preprocessing(spec):
            return ImageSettings(
                dim=hidden, processor=_read_json(processor_cfg), size=None, mean=None, std=None
            )
        return ImageSettings(
            dim=hidden,
            processor=None,
            size=int(spec.preprocessing.get("image_size") or config.get("image_size") or 224),
            mean=tuple(spec.preprocessing.get("mean") or IMAGENET_MEAN),
            std=tuple(spec.preprocessing.get("std") or IMAGENET_STD),
        )

    def __init__(self, spec: EncoderSpec, model_dir: Path, weights_sha256: str, device: str = "cpu") -> None:
        super().__init__(spec, device)
        self.settings = self.resolve(spec, model_dir)
        self.processor = None
        if self.settings.processor is not None:
            self.processor = _load_image_processor(model_dir)
        else:
            self.size, self.mean, self.std = self.settings.size, self.settings.mean, self.settings.std
        model = _load_auto("AutoModel", model_dir, use_safetensors=True)
        self.model = _freeze(model, device).to(memory_format=torch.channels_last)
        self.dim = self.settings.dim
        self.fingerprint = self.settings.fingerprint(weights_sha256, spec, device)

    def _to_array(self, image) -> np.ndarray:
        if self.processor is not None:
            return self.processor(images=[image], return_tensors="np")["pixel_values"][0].astype(np.float32)
        return pil_preprocess(image, self.size, self.mean, self.std)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        hidden = out.last_hidden_state
        if self.spec.pooling == "pooler":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise EncoderConfigError(
                    f"encoder {self.spec.name!r}: pooling 'pooler' but the model has no pooler"
                )
            return pooled.flatten(1)
        if hidden.ndim == 4:  # conv feature map [B, C, H, W]: only a spatial mean makes sense
            return hidden.mean(dim=(2, 3))
        if self.spec.pooling == "cls":
            return hidden[:, 0]
        return hidden.mean(1)


def _wants_own_preprocessing(spec: EncoderSpec) -> bool:
    return any(k in spec.preprocessing for k in ("image_size", "mean", "std"))


def _load_image_processor(model_dir: Path):
    import transformers

    major = int(transformers.__version__.split(".")[0])
    # The PIL backend: torchvision is not a dependency of this project.
    kwargs = {"backend": "pil"} if major >= 5 else {"use_fast": False}
    return _load_auto("AutoImageProcessor", model_dir, **kwargs)


class TorchImageEncoder(_ImageEncoder):
    """Image -> [B, D] through a plain torch module taking normalised [B, 3, size, size]."""

    @classmethod
    def resolve(
        cls, spec: EncoderSpec, dim: int, image_size: int, mean, std, folded: bool = False
    ) -> ImageSettings:
        """The module's own size/mean/std (e.g. from its config file) unless the spec overrides them;
        `folded`: the module's BatchNorms are folded into its convolutions."""
        return ImageSettings(
            dim=int(dim),
            processor=None,
            size=int(spec.preprocessing.get("image_size") or image_size),
            mean=tuple(spec.preprocessing.get("mean") or mean),
            std=tuple(spec.preprocessing.get("std") or std),
            folded=folded,
        )

    def __init__(
        self,
        spec: EncoderSpec,
        module: torch.nn.Module,
        dim: int,
        image_size: int,
        mean,
        std,
        weights_sha256: str,
        device: str = "cpu",
        folded: bool = False,
    ) -> None:
        super().__init__(spec, device)
        self.settings = self.resolve(spec, dim, image_size, mean, std, folded)
        self.size, self.mean, self.std = self.settings.size, self.settings.mean, self.settings.std
        self.model = _freeze(module, device).to(memory_format=torch.channels_last)
        self.dim = self.settings.dim
        self.fingerprint = self.settings.fingerprint(weights_sha256, spec, device)

    def _to_array(self, image) -> np.ndarray:
        return pil_preprocess(image, self.size, self.mean, self.std)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1)


# ----------------------------------------------------------------------------------------------- audio


class _AudioEncoder(_TorchEncoder):
    sorts_by_cost = True
    max_seconds: float = 30.0

    def prepare(self, payload: Any, media_id: str = "") -> np.ndarray:
        if isinstance(payload, np.ndarray):
            wave = payload.astype(np.float32, copy=False).reshape(-1)
        else:
            # Decoding only the window the encoder sees keeps long recordings cheap.
            wave = _media().decode_audio(payload, self.sample_rate, media_id, max_seconds=self.max_seconds)
        if wave.size == 0:
            raise _media().MediaError(media_id, "empty", "the audio has no samples")
        # Only the first window is encoded, so keep only that much in the engine's buffer.
        return wave[: int(self.max_seconds * self.sample_rate)]

    def cost(self, payload: Any) -> int:
        if isinstance(payload, np.ndarray):
            return int(payload.size)
        if isinstance(payload, (bytes, bytearray)):
            return len(payload)
        with contextlib.suppress(OSError, TypeError):
            return os.path.getsize(payload)
        return 1


@dataclass(frozen=True)
class WhisperSettings(ResolvedSettings):
    short_clip: bool
    window_s: float | None = None  # None: Whisper's own 30-s window

    def effective(self) -> dict[str, Any]:
        # window_s only where set, so that the fingerprints of encoders without it stay as they were
        out: dict[str, Any] = {"short_clip": self.short_clip}
        if self.window_s is not None:
            out["window_s"] = self.window_s
        return out


class WhisperAudioEncoder(_AudioEncoder):
    """Audio -> [B, d_model]: Whisper encoder states averaged over the frames that hold real audio."""

    @classmethod
    def resolve(cls, spec: EncoderSpec, model_dir: Path) -> WhisperSettings:
        """Mean pooling only, options.short_clip, d_model."""
        if spec.pooling != "mean":
            raise EncoderConfigError(
                f"encoder {spec.name!r}: Whisper has no CLS token or pooler; use pooling 'mean', not {spec.pooling!r}"
            )
        d_model = read_config(model_dir).get("d_model")
        if isinstance(d_model, bool) or not isinstance(d_model, int):
            raise EncoderUnavailable(f"{model_dir}: config.json does not say d_model")
        short_clip = bool(spec.options.get("short_clip", False))
        window = spec.options.get("window_s")
        if window is not None:
            full = int(read_config(model_dir).get("max_source_positions", 1500)) * 2 * 160 / 16000
            if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 < window <= full:
                raise EncoderConfigError(
                    f"encoder {spec.name!r}: options.window_s must be a number of seconds in (0, {full:g}], "
                    f"got {window!r}"
                )
            if short_clip:
                raise EncoderConfigError(
                    f"encoder {spec.name!r}: options.window_s and short_clip exclude each other (a short "
                    "clip has no window)"
                )
            window = float(window)
        return WhisperSettings(dim=d_model, short_clip=short_clip, window_s=window)

    def __init__(self, spec: EncoderSpec, model_dir: Path, weights_sha256: str, device: str = "cpu") -> None:
        super().__init__(spec, device)
        from transformers import WhisperFeatureExtractor, WhisperModel

        self.settings = self.resolve(spec, model_dir)
        config = read_config(model_dir)
        if (model_dir / "preprocessor_config.json").is_file():
            self.feature_extractor = _load_auto("WhisperFeatureExtractor", model_dir)
        else:  # a converted checkpoint without one: Whisper's standard front end for its mel-bin count
            self.feature_extractor = WhisperFeatureExtractor(feature_size=int(config.get("num_mel_bins", 80)))
        try:
            with _quiet_loading():
                whisper = WhisperModel.from_pretrained(str(model_dir), use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderUnavailable(f"cannot load a Whisper model from {model_dir}: {exc}") from exc
        self.encoder = _freeze(whisper.get_encoder(), device)
        del whisper  # the decoder is never used
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.hop = int(self.feature_extractor.hop_length)
        self.max_frames = int(self.encoder.config.max_source_positions)  # encoder frames (after stride 2)
        self.max_seconds = self.max_frames * 2 * self.hop / self.sample_rate
        self.window_frames = self.max_frames
        if self.settings.window_s is not None:  # a shorter window: fewer frames, padded with silence
            self.window_frames = max(1, round(self.settings.window_s * self.sample_rate / (2 * self.hop)))
            self.max_seconds = self.window_frames * 2 * self.hop / self.sample_rate
        self.short_clip = self.settings.short_clip
        self.dim = self.settings.dim
        self.fingerprint = self.settings.fingerprint(weights_sha256, spec, device)

    def real_frames(self, n_samples: int) -> int:
        """Encoder frames that cover `n_samples` of real audio: ceil(n / (2 * hop)), at least 1."""
        return max(1, min(self.window_frames, math.ceil(n_samples / (2 * self.hop))))

    def forward(self, prepared: list[np.ndarray]) -> np.ndarray:
        """list of B float32 waveforms [T_i] at `sample_rate` -> float32 [B, d_model]."""
        if self.short_clip:
            return self._run(self._short_clip, prepared)
        if self.window_frames < self.max_frames:
            return self._run(self._short_window, prepared)
        return self._run(self._full_window, prepared)

    def _short_window(self, waves: list[np.ndarray]) -> torch.Tensor:
        """Like the 30-s window, on the first `window_frames` frames only: the same log-mel features
        (computed on the 30-s window, so their normalisation is unchanged) cut to the window, the
        clip padded with silence to it, every frame attended to, the mean over the real frames."""
        enc = self.encoder
        with _fp32():
            feats = self.feature_extractor(waves, sampling_rate=self.sample_rate, return_tensors="pt")
        x = feats["input_features"][:, :, : 2 * self.window_frames].to(self.device)
        h = torch.nn.functional.gelu(enc.conv1(x))
        h = torch.nn.functional.gelu(enc.conv2(h)).permute(0, 2, 1)  # [B, window_frames, d]
        h = h + enc.embed_positions.weight[: h.shape[1]].to(h.dtype)
        for layer in enc.layers:
            h = layer(h, None)
        h = enc.layer_norm(h)
        n = torch.tensor([self.real_frames(len(w)) for w in waves], device=h.device)
        return masked_mean(h, torch.arange(h.shape[1], device=h.device)[None, :] < n[:, None])

    def _full_window(self, waves: list[np.ndarray]) -> torch.Tensor:
        with _fp32():
            feats = self.feature_extractor(waves, sampling_rate=self.sample_rate, return_tensors="pt")
        hidden = self.encoder(input_features=feats["input_features"].to(self.device)).last_hidden_state
        n = torch.tensor([self.real_frames(len(w)) for w in waves], device=hidden.device)
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < n[:, None]
        return masked_mean(hidden, mask)

    def _short_clip(self, waves: list[np.ndarray]) -> torch.Tensor:
        """The encoder on each clip's own length: [B, T_i] -> [B, d_model].

        Mel frames beyond a clip are zeroed before each convolution (what the convolution's own zero
        padding sees when the clip runs alone), padded frames are masked out as attention keys, and
        positions use the first rows of the positional embedding, as in the 30-s window.
        """
        enc = self.encoder
        mels = []
        for w in waves:
            if len(w) < 2 * self.hop:  # fewer samples than one encoder frame: pad with silence
                w = np.pad(w, (0, 2 * self.hop - len(w)))
            with _fp32():
                f = self.feature_extractor(
                    w, sampling_rate=self.sample_rate, padding="longest", return_tensors="np"
                )
            mels.append(f["input_features"][0][:, : 2 * self.max_frames])  # [n_mels, L_i]
        lengths = [m.shape[1] for m in mels]
        total = max(lengths) + max(lengths) % 2  # conv2 has stride 2
        x = np.zeros((len(mels), mels[0].shape[0], total), dtype=np.float32)
        for i, m in enumerate(mels):
            x[i, :, : m.shape[1]] = m
        x_t = torch.from_numpy(x).to(self.device)
        mel_len = torch.tensor(lengths, device=self.device)
        mel_mask = (torch.arange(total, device=self.device)[None, :] < mel_len[:, None]).unsqueeze(1)
        h = torch.nn.functional.gelu(enc.conv1(x_t)) * mel_mask
        h = torch.nn.functional.gelu(enc.conv2(h)).permute(0, 2, 1)  # [B, T, d]
        n_frames = total // 2
        h = h + enc.embed_positions.weight[:n_frames].to(h.dtype)
        frames = (mel_len + 1) // 2
        key_mask = torch.arange(n_frames, device=self.device)[None, :] < frames[:, None]  # [B, T]
        attn = torch.zeros(len(mels), 1, n_frames, n_frames, device=self.device, dtype=h.dtype)
        attn = attn.masked_fill(~key_mask[:, None, None, :], _MASK_VALUE)
        for layer in enc.layers:
            h = layer(h, attn)
        h = enc.layer_norm(h)
        return masked_mean(h, key_mask)


@dataclass(frozen=True)
class TowerSettings(ResolvedSettings):
    tower: str

    def effective(self) -> dict[str, Any]:
        return {"tower": self.tower}


def resolve_tower(spec: EncoderSpec) -> str:
    """options.tower (default: the modality); it must agree with the modality."""
    tower = spec.options.get("tower", spec.modality)
    if tower != spec.modality:
        raise EncoderConfigError(f"encoder {spec.name!r}: tower {tower!r} != modality {spec.modality!r}")
    return tower


class ClapEncoder(_TorchEncoder):
    """CLAP audio or text tower -> [B, projection_dim], the raw projection (not normalised)."""

    @classmethod
    def resolve(cls, spec: EncoderSpec, model_dir: Path) -> TowerSettings:
        """The tower and config.json's projection_dim (512 when it says none)."""
        return TowerSettings(
            dim=int(read_config(model_dir).get("projection_dim", 512)), tower=resolve_tower(spec)
        )

    def __init__(self, spec: EncoderSpec, model_dir: Path, weights_sha256: str, device: str = "cpu") -> None:
        super().__init__(spec, device)
        from transformers import ClapModel

        self.settings = self.resolve(spec, model_dir)
        self.tower = self.settings.tower
        try:
            with _quiet_loading():
                model = ClapModel.from_pretrained(str(model_dir), use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderUnavailable(f"cannot load a CLAP model from {model_dir}: {exc}") from exc
        if self.tower == "audio":
            self.feature_extractor = _load_auto("ClapFeatureExtractor", model_dir)
            self.sample_rate = int(self.feature_extractor.sampling_rate)
            self.max_seconds = float(self.feature_extractor.nb_max_samples) / self.sample_rate
            # An unfused model takes one 10-s mel; "fusion" stacks 4 views and only suits fused checkpoints.
            fused = bool(getattr(model.config.audio_config, "enable_fusion", False))
            self.truncation = "fusion" if fused else "rand_trunc"
            self.towers = torch.nn.ModuleList([model.audio_model, model.audio_projection])
        else:
            self.tokenizer = _load_auto("AutoTokenizer", model_dir)
            self.max_length = int(
                spec.preprocessing.get("max_length") or min(self.tokenizer.model_max_length, 512)
            )
            self.towers = torch.nn.ModuleList([model.text_model, model.text_projection])
        self.towers = _freeze(self.towers, device)
        del model
        self.dim = self.settings.dim
        self.sorts_by_cost = True
        self.fingerprint = self.settings.fingerprint(weights_sha256, spec, device)

    def prepare(self, payload: Any, media_id: str = "") -> Any:
        if self.tower == "text":
            if not isinstance(payload, str):
                raise _not_text(payload, media_id)
            return payload
        return _AudioEncoder.prepare(self, payload, media_id)  # type: ignore[arg-type]

    def cost(self, payload: Any) -> int:
        if self.tower == "text":
            return len(payload) if isinstance(payload, str) else 1
        return _AudioEncoder.cost(self, payload)  # type: ignore[arg-type]

    def forward(self, prepared: list[Any]) -> np.ndarray:
        """B texts or B float32 waveforms at `sample_rate` -> float32 [B, projection_dim]."""
        model, projection = self.towers[0], self.towers[1]
        if self.tower == "text":
            enc = self.tokenizer(
                list(prepared), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)

            def run_text():
                return projection(
                    model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
                )

            return self._run(run_text)
        # Clips are cut to the first window in prepare, so the extractor never crops at random.
        with _fp32():
            feats = self.feature_extractor(
                list(prepared),
                sampling_rate=self.sample_rate,
                truncation=self.truncation,
                return_tensors="pt",
            )

        def run_audio():
            out = model(
                input_features=feats["input_features"].to(self.device),
                is_longer=feats["is_longer"].to(self.device),
            )
            return projection(out.pooler_output)

        return self._run(run_audio)


# ------------------------------------------------------------------------------------------- builders


_FolderEncoder = HFTextEncoder | HFImageEncoder | WhisperAudioEncoder | ClapEncoder


def encoder_class(spec: EncoderSpec, model_dir: Path) -> type[_FolderEncoder]:
    """The encoder class for a local transformers folder, picked by modality and config.json's model_type."""
    model_type = read_config(model_dir).get("model_type", "")
    if model_type == "clap":
        return ClapEncoder
    if spec.modality == "text":
        return HFTextEncoder
    if spec.modality == "image":
        return HFImageEncoder
    if model_type == "whisper":
        return WhisperAudioEncoder
    raise EncoderUnavailable(
        f"encoder {spec.name!r}: audio model type {model_type!r} is not supported (Whisper and CLAP are)"
    )


def build_from_dir(
    spec: EncoderSpec, model_dir: Path, weights_sha256: str, device: str = "cpu"
) -> FrozenEncoder:
    """The encoder for a local transformers folder (see encoder_class)."""
    return encoder_class(spec, model_dir)(spec, model_dir, weights_sha256, device)


def resolve_from_dir(spec: EncoderSpec, model_dir: Path) -> ResolvedSettings:
    """What build_from_dir's encoder would resolve (dim, effective settings), read from config files
    only: no tokenizer, processor or model is loaded."""
    return encoder_class(spec, model_dir).resolve(spec, model_dir)


def hf_model_dir(spec: EncoderSpec, cache_dir: Path | None = None) -> tuple[Path, str]:
    """source: hf -> (local folder or hub snapshot, sha256 of its files); the hash is cached in memory
    and in cache_dir/weights-sha256.json."""
    model_dir = resolve_model_dir(spec.model, cache_dir)
    cache_file = Path(cache_dir) / "weights-sha256.json" if cache_dir else None
    return model_dir, hash_model_dir(model_dir, cache_file)


def build_hf_encoder(spec: EncoderSpec, device: str = "cpu", cache_dir: Path | None = None) -> FrozenEncoder:
    """source: hf -> a local folder or hub snapshot, hashed (cached) for the fingerprint, then loaded."""
    model_dir, weights = hf_model_dir(spec, cache_dir)
    return build_from_dir(spec, model_dir, weights, device)


def hf_status(spec: EncoderSpec) -> tuple[bool, str]:
    """Cheap availability check for source hf: no model is loaded."""
    path = Path(spec.model).expanduser()
    if looks_like_path(spec.model):
        if not path.is_dir():
            return False, f"model folder {path} does not exist"
        if (path / "config.json").is_file():
            return True, f"local folder {path}"
        return False, f"{path} has no config.json"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False, "huggingface_hub is not installed"
    try:
        cached = try_to_load_from_cache(spec.model, "config.json")
    except ValueError as exc:  # huggingface_hub's HFValidationError: not a well-formed hub id
        return False, f"{spec.model!r} is neither a local folder nor a valid hub id ({exc})"
    if isinstance(cached, str):
        return True, "in the local hub cache"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False, "not in the local hub cache and HF_HUB_OFFLINE=1"
    return True, "will be downloaded from the hub on first use"
