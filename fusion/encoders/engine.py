"""The batched extraction engine: stream (media_id, payload) items through a frozen encoder.

Items are buffered in windows of `window_batches` batches; within a window, text and audio items are
sorted by cost (tokens, samples) so that each batch pads little, then cut into batches. Each batch
comes back as an ExtractBatch whose media ids line up with its vector rows. Bad media
(fusion.media.MediaError while loading or decoding, or an encoder output that is not finite) do not
stop the run: they are reported in `failures` with their media id. Latents stay raw (not normalised).
A `load` callback turns each stored payload into the one to decode just before its window is decoded
(the pipeline re-checks and re-hashes a file there, so what is encoded is what was checked).

Decoding overlaps the forward pass: `workers` threads (default: one per core this process may use,
at most 4, for images and audio; none for text; $FUSEMIX_DECODE_WORKERS overrides) load and prepare
the items of the next windows while the model runs on the current one (image decoding, SVG
rendering, resampling and file hashing release the GIL for most of their time, as does torch's
forward pass). Output order and failure reports are those of the sequential path (workers=0).

    from fusion.encoders import build_encoder, extract, load_registry
    enc = build_encoder(load_registry()["minilm"])
    for batch in extract(enc, [("id1", "a cat"), ("id2", "a dog")]):
        print(batch.media_ids, batch.vectors.shape, batch.failures)
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fusion.encoders.base import FrozenEncoder
from fusion.media import MediaError


@dataclass
class ExtractBatch:
    """One encoded batch: vectors float32 [n, dim], row i belongs to media_ids[i]; failures are the
    items of this stretch of input that could not be encoded."""

    media_ids: list[str]
    vectors: np.ndarray
    failures: list[MediaError] = field(default_factory=list)


def configure_threads(device: str) -> int:
    """On CPU, sets torch's intra-op threads: $FUSEMIX_TORCH_THREADS when set (several extraction
    processes side by side should split the cores), else at most the cores this process may use
    (containers and taskset often allow fewer than torch's default, and oversubscription is much
    slower). Returns the thread count."""
    if not device.startswith("cpu"):
        return torch.get_num_threads()
    wanted = os.environ.get("FUSEMIX_TORCH_THREADS", "").strip()
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise ValueError(f"FUSEMIX_TORCH_THREADS must be a positive integer, got {wanted!r}")
        torch.set_num_threads(int(wanted))
        return torch.get_num_threads()
    allowed = _allowed_cores()
    if torch.get_num_threads() > allowed:
        torch.set_num_threads(allowed)
    return torch.get_num_threads()


def _allowed_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def decode_workers(workers: int | None = None, modality: str = "image") -> int:
    """Threads that prepare items beside the forward pass: `workers` if given, else
    $FUSEMIX_DECODE_WORKERS, else one per usable core, at most 4, for images and audio, and none for
    text (preparing a caption only checks it, so threads would only compete with the forward pass).
    0 decodes in the calling thread."""
    if workers is None:
        wanted = os.environ.get("FUSEMIX_DECODE_WORKERS", "").strip()
        if wanted:
            if not wanted.isdigit():
                raise ValueError(f"FUSEMIX_DECODE_WORKERS must be a whole number >= 0, got {wanted!r}")
            workers = int(wanted)
        else:
            workers = 0 if modality == "text" else min(4, _allowed_cores())
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return workers


def _sorts(encoder: FrozenEncoder) -> bool:
    return bool(getattr(encoder, "sorts_by_cost", encoder.modality != "image"))


def extract(
    encoder: FrozenEncoder,
    items: Iterable[tuple[str, Any]],
    batch_size: int | None = None,
    progress: bool = True,
    total: int | None = None,
    window_batches: int = 16,
    load: Callable[[str, Any], Any] | None = None,
    workers: int | None = None,
) -> Iterator[ExtractBatch]:
    """Encodes `items` ((media_id, payload) pairs) in batches; yields ExtractBatch as it goes.

    batch_size: items per forward pass (default: the spec's). total: item count for the progress bar.
    load: `load(media_id, payload) -> payload` runs on each item right before it is decoded; it raises
    fusion.media.MediaError to refuse the item (reported in failures like a decoding error).
    workers: decoding threads (decode_workers; 0: decode in this thread, between forward passes).
    Every input id appears exactly once, either in some batch's media_ids or in some batch's failures.
    """
    bs = int(batch_size or encoder.spec.batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be positive, got {bs}")
    n_workers = decode_workers(workers, encoder.modality)
    configure_threads(getattr(encoder, "device", "cpu"))
    # Images all cost the same, so a window larger than one batch would only hold memory.
    window = bs * max(1, window_batches) if _sorts(encoder) else bs
    bar = tqdm(total=total, desc=f"encode {encoder.spec.name}", unit="item", disable=not progress)
    try:
        if n_workers == 0:
            for chunk in _windows(items, window):
                yield from _encode_window(encoder, _prepare_all(encoder, chunk, load), bs, bar)
            return
        # Windows ahead of the one being encoded: enough to keep every worker busy, at least one.
        ahead = max(1, -(-2 * n_workers // window))
        with ThreadPoolExecutor(n_workers, thread_name_prefix=f"decode-{encoder.spec.name}") as pool:
            queued: deque[list[Future]] = deque()
            try:
                for chunk in _windows(items, window):
                    queued.append([pool.submit(_prepare_one, encoder, mid, p, load) for mid, p in chunk])
                    if len(queued) > ahead:
                        yield from _encode_window(encoder, [f.result() for f in queued.popleft()], bs, bar)
                while queued:
                    yield from _encode_window(encoder, [f.result() for f in queued.popleft()], bs, bar)
            finally:  # a consumer that stops early (or an error) must not leave decoding running
                for futures in queued:
                    for future in futures:
                        future.cancel()
    finally:
        bar.close()


def _windows(items: Iterable[tuple[str, Any]], size: int) -> Iterator[list[tuple[str, Any]]]:
    buffer: list[tuple[str, Any]] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def _prepare_one(
    encoder: FrozenEncoder, media_id: str, payload: Any, load: Callable[[str, Any], Any] | None
) -> tuple[str, Any] | MediaError:
    """(media_id, prepared item), or the MediaError that refused it."""
    try:
        if load is not None:
            payload = load(media_id, payload)
        return media_id, encoder.prepare(payload, media_id)
    except MediaError as err:
        if not err.media_id:
            err.media_id = media_id
        return err


def _prepare_all(
    encoder: FrozenEncoder, window: list[tuple[str, Any]], load: Callable[[str, Any], Any] | None
) -> list[tuple[str, Any] | MediaError]:
    return [_prepare_one(encoder, mid, payload, load) for mid, payload in window]


def _encode_window(
    encoder: FrozenEncoder,
    prepared: list[tuple[str, Any] | MediaError],
    bs: int,
    bar,
) -> Iterator[ExtractBatch]:
    failures = [p for p in prepared if isinstance(p, MediaError)]
    ready = [p for p in prepared if not isinstance(p, MediaError)]
    bar.update(len(failures))
    if _sorts(encoder):
        # Stable sort: equal-cost items keep input order, and ids travel with their payloads.
        ready.sort(key=lambda pair: encoder.cost(pair[1]))
    if not ready:
        yield ExtractBatch([], np.zeros((0, encoder.dim), dtype=np.float32), failures)
        return
    for start in range(0, len(ready), bs):
        chunk = ready[start : start + bs]
        vectors = np.asarray(encoder.forward([p for _, p in chunk]), dtype=np.float32)
        if vectors.shape != (len(chunk), encoder.dim):
            raise RuntimeError(
                f"encoder {encoder.spec.name!r} returned shape {vectors.shape}, expected {(len(chunk), encoder.dim)}"
            )
        ids = [mid for mid, _ in chunk]
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            for mid in np.asarray(ids, dtype=object)[~finite]:
                failures.append(MediaError(mid, "undecodable", "the encoder produced NaN or infinite values"))
            ids = [mid for mid, ok in zip(ids, finite, strict=True) if ok]
            vectors = vectors[finite]
        yield ExtractBatch(ids, np.ascontiguousarray(vectors), failures)
        failures = []  # report each failure once, with the first batch of its window
        bar.update(len(chunk))
