"""LAION-CLAP's audio tower from the `laion_clap` package and a LAION .pt checkpoint, built offline.

    encoders:
      clap-audio: {modality: audio, source: laion_clap, model: HTSAT-tiny,
                   options: {checkpoint: ~/models/630k-audioset-best.pt}}

What it computes: the clip decoded and resampled to 48 kHz by fusion.media, the first 10 s kept,
quantised to int16 and back and repeated (then zero-padded) to 10 s, as laion_clap's own
`get_audio_embedding_from_data` prepares a 48-kHz clip (its file-list variant resamples with librosa
instead); HTS-AT (`audio_branch`) -> 768-d clip embedding (1024/2048 for base/large) -> the
two-layer `audio_projection` -> float32 [B, 512], the raw joint embedding (laion_clap L2-normalises
it; latents stay raw here, as for every encoder). Every clip becomes one 10-s input, so a batch gives
the same latents as one clip at a time, and nothing is random at inference (laion_clap crops clips
longer than 10 s at a random offset; this encoder decodes only their first 10 s).

Installing: `make install` does it, on numpy 2. laion-clap 1.1.7 declares numpy<2 and a training
stack (wandb, webdataset, h5py, torchvision-era code) it does not need to run the audio model, so it
installs with `pip install --no-deps -c constraints.txt laion-clap` next to the project's `clap`
extra (`pip install -c constraints.txt -e ".[clap]"`: torchlibrosa and librosa, what the audio
model imports).

Why not `laion_clap.CLAP_Module`: building it loads roberta-base from the Hugging Face hub (its text
branch), and `import laion_clap` imports torchvision, which does not install beside this torch. This
module builds only the audio tower from laion_clap's own model code (`htsat.py`, imported through
fusion.encoders._laion_htsat, which says how), with the model config laion_clap ships
(`clap_module/model_configs/<model>.json`), and loads the audio keys of the checkpoint into it.

Checkpoints: LAION's .pt files (e.g. 630k-audioset-best.pt, 630k-best.pt: the non-fusion ones) hold
{"state_dict": {"module.audio_branch...": ...}, ...}; a bare state dict, keys with or without the
"module." prefix, and a .safetensors file of the same keys load too. Every `audio_branch.*` and
`audio_projection.*` key must match the model exactly (strict), the rest (text branch, optimizer) is
ignored. .pt files are read with torch.load(weights_only=True): nothing but tensors and plain
containers is unpickled, so a checkpoint holding other objects is refused rather than run.

The fingerprint hashes the checkpoint file (sha256; cached per file size and mtime in this process)
plus the tower and the input preparation, so two checkpoints never share latents; the file's path is
left out of it, so a moved checkpoint keeps its latents. describe_encoder needs only the file, not
the package. Forward passes run in float32 whatever `dtype` says (the STFT and mel front end is not
autocast-safe).

Not supported (EncoderConfigError, with the reason): the text tower (it is roberta-base, fetched from
the hub; a CLAP text tower loads offline through `source: hf` from a local transformers folder),
fusion checkpoints (`enable_fusion: true`; their front end needs torchaudio and they differ from the
non-fusion model only on clips longer than 10 s) and the PANN audio models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from fusion.encoders.base import (
    EncoderConfigError,
    EncoderSpec,
    EncoderUnavailable,
    FrozenEncoder,
    ResolvedSettings,
)

SAMPLE_RATE = 48_000  # laion_clap's models are trained on 48 kHz audio
WINDOW_S = 10.0  # HTS-AT's input: 480,000 samples (its model configs' clip_samples)
DIM = 512  # the joint embedding size of every laion_clap model
# The HTS-AT configs laion_clap 1.1.7 ships (clap_module/model_configs/<name>.json).
MODELS = ("HTSAT-tiny", "HTSAT-tiny-win-1536", "HTSAT-base", "HTSAT-large")
# What `make install` installs; the message a user sees where it is missing.
INSTALL_HINT = (
    "`make install` installs it; by hand: pip install -c constraints.txt -e '.[clap]' "
    "&& pip install --no-deps -c constraints.txt laion-clap"
)
_AUDIO_PREFIXES = ("audio_branch.", "audio_projection.")
_OPTIONS = ("checkpoint", "tower", "enable_fusion")


# ------------------------------------------------------------------------------------ spec checks


def _spec_problem(spec: EncoderSpec) -> str | None:
    """Why the spec cannot describe a laion_clap audio tower (None when it can)."""
    if spec.modality != "audio":
        return (
            "audio tower only: source laion_clap builds LAION-CLAP's audio tower (its text tower is "
            "roberta-base from the hub); for CLAP's text tower use source hf with a local transformers "
            "CLAP folder and options.tower: text"
        )
    if spec.model not in MODELS:
        return f"model must be one of {MODELS} (laion_clap's HTS-AT configs), got {spec.model!r}"
    if spec.options.get("enable_fusion"):
        return (
            "enable_fusion checkpoints are not supported (their front end needs torchaudio); use a "
            "non-fusion checkpoint such as 630k-audioset-best.pt"
        )
    unknown = sorted(set(spec.options) - set(_OPTIONS))
    if unknown:
        return f"unknown option(s) {unknown} for source laion_clap (known: {list(_OPTIONS)})"
    return None


def _checkpoint_problem(spec: EncoderSpec) -> str | None:
    checkpoint = spec.options.get("checkpoint")
    if not checkpoint:
        return (
            "set options.checkpoint to a LAION-CLAP .pt file: a non-fusion checkpoint such as "
            "630k-audioset-best.pt, downloaded once from LAION's release"
        )
    if not Path(str(checkpoint)).expanduser().is_file():
        return f"checkpoint {checkpoint} does not exist"
    return None


def _package_problem() -> str | None:
    for module, name in (("laion_clap", "laion-clap"), ("torchlibrosa", "torchlibrosa")):
        if importlib.util.find_spec(module) is None:
            return f"{name} is not installed: {INSTALL_HINT}"
    return None


def laion_status(spec: EncoderSpec) -> tuple[bool, str]:
    """Cheap check for `fusemix encoder list`: spec, package and checkpoint (no model is built)."""
    problem = _spec_problem(spec) or _checkpoint_problem(spec) or _package_problem()
    if problem:
        return False, problem
    version = importlib.metadata.version("laion_clap")
    checkpoint = Path(str(spec.options["checkpoint"])).expanduser()
    return True, f"offline: {spec.model} audio tower from {checkpoint} (laion_clap {version})"


# ----------------------------------------------------------------------------------- fingerprint

_hash_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of one file, cached in this process on (path, size, mtime) so a 2-GB checkpoint is read once."""
    path = path.resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hashes:
            return _hashes[key]
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    with _hash_lock:
        _hashes[key] = h.hexdigest()
    return _hashes[key]


@dataclass(frozen=True)
class LaionSettings(ResolvedSettings):
    checkpoint: Path
    autocasts = False  # the mel front end and HTS-AT run in float32 whatever the spec's dtype says

    def effective(self) -> dict[str, Any]:
        # The input preparation is fixed by this module; naming it here means a change to it changes
        # the fingerprint instead of silently mixing latents.
        return {"tower": "audio", "input": "48kHz first-10s int16 repeatpad"}

    def weights_sha256(self, cache_file: Path | None = None) -> str:
        """The checkpoint file's sha256 (what the fingerprint names as the weights)."""
        return file_sha256(self.checkpoint)

    def fingerprint(self, weights_sha256: str, spec: EncoderSpec, device: str = "cpu") -> str:
        # The checkpoint's path is left out, as hf leaves out a model's folder: the weights hash is
        # its content, so a moved or renamed file keeps its latents.
        options = {k: v for k, v in spec.options.items() if k != "checkpoint"}
        return super().fingerprint(weights_sha256, dataclasses.replace(spec, options=options), device)


# ------------------------------------------------------------------------------------------ model


def _htsat_module():
    """laion_clap's htsat.py, imported without laion_clap's __init__ (see fusion.encoders._laion_htsat)."""
    problem = _package_problem()
    if problem:
        raise EncoderUnavailable(problem)
    return importlib.import_module("fusion.encoders._laion_htsat.htsat")


def model_config(model: str) -> dict[str, Any]:
    """laion_clap's model config for `model` (one of MODELS): {"embed_dim", "audio_cfg", ...}."""
    from fusion.encoders._laion_htsat import CLAP_MODULE_DIR

    if CLAP_MODULE_DIR is None:
        raise EncoderUnavailable(f"laion-clap is not installed: {INSTALL_HINT}")
    path = Path(CLAP_MODULE_DIR) / "model_configs" / f"{model}.json"
    if model not in MODELS or not path.is_file():
        raise EncoderConfigError(f"laion_clap has no HTS-AT model config {model!r} (known: {MODELS})")
    return json.loads(path.read_text(encoding="utf-8"))


class ClapAudioTower(nn.Module):
    """HTS-AT + projection with laion_clap CLAP's parameter names (`audio_branch.*`,
    `audio_projection.*`), so the audio keys of a LAION checkpoint load into it as they are."""

    def __init__(self, audio_branch: nn.Module, embed_dim: int, joint_dim: int = DIM) -> None:
        super().__init__()
        self.audio_branch = audio_branch
        self.audio_projection = nn.Sequential(
            nn.Linear(embed_dim, joint_dim), nn.ReLU(), nn.Linear(joint_dim, joint_dim)
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform [B, 480000] (10 s at 48 kHz) -> raw joint embedding [B, 512]."""
        out = self.audio_branch({"waveform": waveform}, mixup_lambda=None, device=waveform.device)
        return self.audio_projection(out["embedding"])


def build_audio_tower(model: str = "HTSAT-tiny") -> ClapAudioTower:
    """The audio tower of laion_clap model `model`, randomly initialised (the encoder loads a
    checkpoint into it). Raises EncoderUnavailable without the package."""
    htsat = _htsat_module()
    cfg = model_config(model)
    audio_cfg = SimpleNamespace(**cfg["audio_cfg"])  # the attributes htsat.py reads off CLAPAudioCfp
    with warnings.catch_warnings():
        # htsat.py calls torch.meshgrid without `indexing`; the default it warns about is the one it needs.
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        branch = htsat.create_htsat_model(audio_cfg, enable_fusion=False, fusion_type="None")
    return ClapAudioTower(branch, int(cfg["embed_dim"]))


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True; memory-mapped where the file allows it, so that a 2-GB
    checkpoint's text branch and optimizer state are never read into memory."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # the pre-1.6 (not zip) format


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The audio-tower tensors of a LAION-CLAP checkpoint, "module." prefixes removed.

    .pt: torch.load(weights_only=True), the state dict under "state_dict" or the file itself;
    .safetensors: the state dict. Raises EncoderUnavailable when the file cannot be read that way or
    holds no audio-tower keys."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = _torch_load(path)
    except Exception as exc:  # pickle, zip and safetensors errors all mean "cannot read it safely"
        raise EncoderUnavailable(
            f"checkpoint {path} cannot be read as weights only ({exc.__class__.__name__}: {exc}); "
            "nothing but tensors and plain containers is unpickled"
        ) from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise EncoderUnavailable(f"checkpoint {path} holds {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(_AUDIO_PREFIXES) and isinstance(value, torch.Tensor):
            out[key] = value
    if not out:
        raise EncoderUnavailable(
            f"checkpoint {path} has no audio_branch.* / audio_projection.* tensors: not a LAION-CLAP checkpoint"
        )
    return out


def load_audio_tower(model: str, checkpoint: Path) -> ClapAudioTower:
    """build_audio_tower(model) with the checkpoint's audio tensors loaded strictly. Raises
    EncoderConfigError when the checkpoint does not fit `model` (another size, a fusion model)."""
    state = read_checkpoint(checkpoint)  # first: an unreadable file fails before the model is built
    tower = build_audio_tower(model)
    try:
        tower.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        expected = set(tower.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise EncoderConfigError(
            f"checkpoint {checkpoint} does not fit laion_clap model {model!r} (a fusion checkpoint or "
            f"another model size?): {len(missing)} missing keys {missing[:3]}, {len(unexpected)} "
            f"unexpected {unexpected[:3]}; {str(exc).splitlines()[-1].strip()[:200]}"
        ) from exc
    return tower


# ---------------------------------------------------------------------------------------- encoder


def prepare_waveform(wave: np.ndarray) -> np.ndarray:
    """float32 [T] at 48 kHz -> float32 [480000]: the first 10 s, quantised to int16 and back, repeated
    whole as often as it fits and zero-padded to 10 s (laion_clap's "repeatpad")."""
    n = int(WINDOW_S * SAMPLE_RATE)
    x = np.asarray(wave, np.float32).reshape(-1)[:n]
    x = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16) / np.float32(32767.0)
    x = np.tile(x.astype(np.float32), n // x.size)
    return np.pad(x, (0, n - x.size))


class LaionClapEncoder(FrozenEncoder):
    """LAION-CLAP audio tower (laion_clap's HTS-AT + projection) -> raw joint embeddings [B, 512]."""

    sample_rate = SAMPLE_RATE

    @classmethod
    def resolve(cls, spec: EncoderSpec) -> LaionSettings:
        """Checkpoint and dim from the spec alone (the laion_clap package is not needed)."""
        problem = _spec_problem(spec)
        if problem:
            raise EncoderConfigError(f"encoder {spec.name!r}: {problem}")
        problem = _checkpoint_problem(spec)
        if problem:
            raise EncoderUnavailable(f"encoder {spec.name!r}: {problem}")
        return LaionSettings(dim=DIM, checkpoint=Path(str(spec.options["checkpoint"])).expanduser())

    def __init__(self, spec: EncoderSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        self.settings = self.resolve(spec)
        problem = _package_problem()
        if problem:
            raise EncoderUnavailable(f"encoder {spec.name!r}: {problem}")
        try:
            tower = load_audio_tower(spec.model, self.settings.checkpoint)
        except (EncoderUnavailable, EncoderConfigError) as exc:
            raise type(exc)(f"encoder {spec.name!r}: {exc}") from exc
        self.tower = tower.to(device).eval().requires_grad_(False)
        self.dim = self.settings.dim
        self.fingerprint = self.settings.fingerprint(self.settings.weights_sha256(), spec, device)

    def prepare(self, payload: Any, media_id: str = "") -> np.ndarray:
        from fusion import media

        if isinstance(payload, np.ndarray):
            wave = payload.astype(np.float32, copy=False).reshape(-1)
        else:
            wave = media.decode_audio(payload, SAMPLE_RATE, media_id, max_seconds=WINDOW_S)
        if wave.size == 0:
            raise media.MediaError(media_id, "empty", "the audio has no samples")
        return prepare_waveform(wave)

    def forward(self, prepared: list[np.ndarray]) -> np.ndarray:
        """B prepared clips (float32 [480000] each) -> float32 [B, 512], not normalised."""
        batch = torch.from_numpy(np.stack(prepared)).to(self.device)
        with torch.inference_mode():
            out = self.tower(batch)
        return out.detach().float().cpu().numpy().astype(np.float32, copy=False)
