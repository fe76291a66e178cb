"""Checkpoint I/O: adapters as safetensors plus a JSON config; nothing is unpickled.

    save_checkpoint(dir, model, adapter_cfg, extra={...})
    model = load_checkpoint(dir, expect={"image": EncoderRef("effnet-lite0", fp, 1280), ...})

Loading checks the encoders a checkpoint was trained on: a model is only meaningful on latents of
the exact frozen encoders (same weights, preprocessing and pooling) that produced its training data.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.config import AdapterConfig, from_dict

FORMAT_VERSION = 1
WEIGHTS = "adapters.safetensors"
CONFIG = "config.json"


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the encoders or dimensions it is being used with."""


def save_checkpoint(
    directory: str | Path,
    model: FusedModel,
    adapter_cfg: AdapterConfig,
    extra: dict | None = None,
    side_files: dict[str, str] | None = None,
) -> Path:
    """Writes the adapters and config.json (plus `side_files`, name -> text, e.g. the training
    history) into `directory` with write_files."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {
        "format_version": FORMAT_VERSION,
        "sides": list(model.sides),
        "encoders": {s: asdict(model.encoders[s]) for s in model.sides},
        "adapter": asdict(adapter_cfg),
        "extra": extra or {},
    }
    return write_files(directory, WEIGHTS, lambda path: save_file(tensors, path), config, side_files)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Writes the file `path` by `write(temporary path)`: to a hidden temporary name in the same
    folder, flushed to disk (fsync), then renamed over `path`, and the folder flushed. A reader, or a
    crash or kill at any moment, finds the old file or the new one, never a part of either; a kill
    leaves at most the hidden temporary file. The one atomic writer of the project's files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # the rename itself survives a power cut once the folder is flushed
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`text` (UTF-8) as the file `path`, written with atomic_write."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_files(
    directory: str | Path,
    weights: str,
    save_weights: Callable[[str], None],
    config: dict,
    side_files: dict[str, str] | None = None,
) -> Path:
    """Writes `weights` (by `save_weights(path)`), then `side_files` (name -> text), then config.json
    into `directory`, each with atomic_write. The old config.json is removed first, so while the files
    are replaced the folder holds no checkpoint at all, and once config.json is back every file beside
    it is the new one: a crash never leaves a half checkpoint, nor new weights under an old config,
    that looks complete. Shared by the adapters and the baselines (evaluation.baselines)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).unlink(missing_ok=True)
    atomic_write(directory / weights, save_weights)
    for name, text in (side_files or {}).items():
        atomic_write_text(directory / name, text)
    atomic_write_text(directory / CONFIG, json.dumps(config, indent=2, sort_keys=True))
    return directory


def check_encoders(
    what: str, sides: list[str], encoders: dict[str, EncoderRef], expect: dict[str, EncoderRef] | None
) -> None:
    """Refuses latents of other encoders: `expect` maps side -> the encoder whose latents will be fed;
    another dimension or fingerprint than the one `what` (a checkpoint, a baseline) was made on
    raises CheckpointMismatch naming both."""
    for side, want in (expect or {}).items():
        if side not in encoders:
            raise CheckpointMismatch(f"{what} has sides {sides}, not {side!r}")
        have = encoders[side]
        if have.dim != want.dim:
            raise CheckpointMismatch(
                f"side {side!r}: {what} expects {have.dim}-d latents from {have.name}, got {want.dim}-d from {want.name}"
            )
        if have.fingerprint != want.fingerprint:
            raise CheckpointMismatch(
                f"side {side!r}: {what} was made on encoder {have.name} (fingerprint {have.fingerprint}), "
                f"not {want.name} (fingerprint {want.fingerprint}); re-extract latents or retrain"
            )


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {directory} (missing {CONFIG})")
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatch(f"checkpoint format {config.get('format_version')} is not {FORMAT_VERSION}")
    return config


def load_checkpoint(
    directory: str | Path, expect: dict[str, EncoderRef] | None = None, device: str = "cpu"
) -> FusedModel:
    """Loads a FusedModel bit-for-bit. `expect` maps side -> the encoder whose latents will be fed;
    a different fingerprint or dimension raises CheckpointMismatch naming both."""
    config = read_config(directory)
    adapter_cfg = from_dict(AdapterConfig, config["adapter"])
    encoders = {s: EncoderRef(**config["encoders"][s]) for s in config["sides"]}
    check_encoders("checkpoint", config["sides"], encoders, expect)
    adapters = {s: Adapter(encoders[s].dim, adapter_cfg) for s in config["sides"]}
    model = FusedModel(adapters, encoders)
    state = load_file(str(Path(directory) / WEIGHTS), device=device)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
