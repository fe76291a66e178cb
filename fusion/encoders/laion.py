"""Optional encoder over the `laion_clap` package (LAION's own CLAP code and .pt checkpoints).

The package is imported lazily and is not a dependency. It cannot be used offline as shipped:
`laion_clap.CLAP_Module(...)` loads `roberta-base` from the Hugging Face hub while it is being
built, so without network (or a pre-filled hub cache) construction fails; that, a missing package
or a missing checkpoint raises EncoderUnavailable with the reason. Prefer `source: hf` with a
transformers CLAP checkpoint (e.g. laion/clap-htsat-unfused), which loads from a local folder.

Registry entry: {modality: audio|text, source: laion_clap, model: HTSAT-tiny (the audio backbone),
options: {checkpoint: /path/to/630k-audioset-best.pt, tower: audio|text, enable_fusion: false}}
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion.encoders.base import (
    EncoderSpec,
    EncoderUnavailable,
    FrozenEncoder,
    ResolvedSettings,
    hash_model_dir,
)

_SAMPLE_RATE = 48_000  # laion_clap's models are trained on 48 kHz audio
_MAX_SECONDS = 10.0
_DIM = 512  # the joint embedding size of every laion_clap model


def _checkpoint_problem(spec: EncoderSpec) -> str | None:
    checkpoint = spec.options.get("checkpoint")
    if not checkpoint:
        return "options.checkpoint (a laion_clap .pt file) is not set"
    if not Path(checkpoint).expanduser().is_file():
        return f"checkpoint {checkpoint} does not exist"
    return None


def laion_status(spec: EncoderSpec) -> tuple[bool, str]:
    """Cheap check: package importable and checkpoint present (construction may still need the hub)."""
    if importlib.util.find_spec("laion_clap") is None:
        return False, "the laion_clap package is not installed (pip install laion-clap)"
    problem = _checkpoint_problem(spec)
    if problem:
        return False, problem
    return True, "laion_clap installed; construction fetches roberta-base from the hub unless it is cached"


@dataclass(frozen=True)
class LaionSettings(ResolvedSettings):
    tower: str
    checkpoint: Path
    autocasts = False  # CLAP_Module's own embedding calls run in float32

    def effective(self) -> dict[str, Any]:
        return {"tower": self.tower}

    def weights_sha256(self, cache_file: Path | None = None) -> str:
        """The hash of the checkpoint's folder (what the fingerprint names as the weights)."""
        return hash_model_dir(self.checkpoint.parent, cache_file)


class LaionClapEncoder(FrozenEncoder):
    """laion_clap CLAP_Module, audio or text tower -> raw embeddings [B, 512]."""

    @classmethod
    def resolve(cls, spec: EncoderSpec) -> LaionSettings:
        """Tower, checkpoint and dim from the spec alone (the laion_clap package is not needed)."""
        problem = _checkpoint_problem(spec)
        if problem:
            raise EncoderUnavailable(f"encoder {spec.name!r}: {problem}")
        checkpoint = Path(spec.options["checkpoint"]).expanduser()
        return LaionSettings(dim=_DIM, tower=spec.options.get("tower", spec.modality), checkpoint=checkpoint)

    def __init__(self, spec: EncoderSpec, device: str = "cpu") -> None:
        ok, why = laion_status(spec)
        if not ok:
            raise EncoderUnavailable(f"encoder {spec.name!r}: {why}")
        import laion_clap

        self.spec = spec
        self.device = device
        self.settings = self.resolve(spec)
        self.tower = self.settings.tower
        checkpoint = self.settings.checkpoint
        try:
            module = laion_clap.CLAP_Module(
                enable_fusion=bool(spec.options.get("enable_fusion", False)), amodel=spec.model, device=device
            )
            module.load_ckpt(str(checkpoint))
        except Exception as exc:  # network, checkpoint format, package internals: all mean "not usable here"
            raise EncoderUnavailable(
                f"encoder {spec.name!r}: laion_clap could not be built ({exc.__class__.__name__}: {exc}); it downloads "
                "roberta-base from the hub during construction, which fails offline"
            ) from exc
        self.module = module.eval()
        self.sample_rate = _SAMPLE_RATE if self.tower == "audio" else None
        self.dim = self.settings.dim
        self.fingerprint = self.settings.fingerprint(self.settings.weights_sha256(), spec)

    def prepare(self, payload: Any, media_id: str = "") -> Any:
        from fusion import media

        if self.tower == "text":
            if not isinstance(payload, str):
                raise media.MediaError(
                    media_id, "undecodable", f"a text encoder takes str, got {type(payload).__name__}"
                )
            return payload
        wave = (
            payload
            if isinstance(payload, np.ndarray)
            else media.decode_audio(payload, _SAMPLE_RATE, media_id, max_seconds=_MAX_SECONDS)
        )
        return np.asarray(wave, np.float32).reshape(-1)[: int(_MAX_SECONDS * _SAMPLE_RATE)]

    def forward(self, prepared: list[Any]) -> np.ndarray:
        """B texts or B waveforms (48 kHz) -> float32 [B, 512], not normalised."""
        with torch.inference_mode():
            if self.tower == "text":
                out = self.module.get_text_embedding(list(prepared), use_tensor=True)
            else:
                width = max(len(w) for w in prepared)
                batch = np.stack([np.pad(w, (0, width - len(w))) for w in prepared])
                out = self.module.get_audio_embedding_from_data(x=torch.from_numpy(batch), use_tensor=True)
        return out.detach().float().cpu().numpy()
