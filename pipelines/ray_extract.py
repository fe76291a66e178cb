"""Latent extraction on Ray: a pool of encoder actors, Lance fragments written by the workers and
committed once by the driver.

    stats = run_extraction_ray(lake, "emoji", spec, workers=2)             # a local Ray on this machine
    stats = run_extraction_ray(lake, "emoji", spec, address="ray://head:10001")  # or a cluster

The driver works out what is missing exactly as the in-process engine does (pipelines.extract: stale
fingerprints and media that left the dataset deleted, failures of the current fingerprint not retried),
without loading the encoder (its fingerprint and dimension come from describe_encoder). It cuts the
missing items into shards and hands them to `workers` actors; each actor builds the frozen encoder once,
runs the project's extraction engine (fusion.encoders.extract: the same batching, precision and file
checks: a stored path must resolve inside the dataset's folders and hash to its media id) and writes
its latents as uncommitted Lance fragments of the table, returning their metadata and its failures.

When every shard is done the driver commits all fragments in one Append and the failures as quarantine
rows, then removes any duplicate media id (another run may have committed the same items meanwhile).
So a job that fails or is killed before the end leaves the table as it was (the fragment files it
wrote are never referenced), and a rerun encodes only what is missing. A worker that dies is restarted
by Ray and its shards are retried (`max_retries`); a retried shard writes new fragments and only the
fragments a finished shard returned are committed, so a kill leaves no duplicate and no gap.

Each actor takes one CPU of Ray's (or one GPU with `gpus_per_worker=1`) and runs torch on
$FUSEMIX_TORCH_THREADS threads, by default this machine's cores divided among the workers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from fusion.encoders import EncoderSpec
from fusion.media import MediaError
from pipelines import schemas
from pipelines.extract import media_payloads, plan, quarantine_failures, summary, verified_file
from pipelines.lake import Lake, vectors_to_arrow
from pipelines.schemas import table_name
from pipelines.storage import writing

# Variables the workers need as the driver sees them (offline hubs, precision, threads, devices).
_FORWARDED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LANCE_LOG", "TOKENIZERS_PARALLELISM")
_FORWARDED_PREFIXES = ("FUSEMIX_", "AWS_")


@dataclass(frozen=True)
class EncoderInfo:
    """What the driver knows of an encoder without loading it (pending() and friends read these)."""

    spec: EncoderSpec
    fingerprint: str
    dim: int

    @property
    def modality(self) -> str:
        return self.spec.modality


class _EncoderWorker:
    """One Ray actor: builds the encoder once, then encodes shards into uncommitted Lance fragments."""

    def __init__(self, spec: EncoderSpec, device: str, cache_dir: str | None) -> None:
        from fusion.encoders import build_encoder

        self.encoder = build_encoder(spec, device=device, cache_dir=Path(cache_dir) if cache_dir else None)

    def describe(self) -> tuple[int, str, int]:
        """(pid, fingerprint, dim) of this worker's encoder."""
        return os.getpid(), self.encoder.fingerprint, self.encoder.dim

    def encode(
        self,
        shard: list[tuple[str, Any]],
        uri: str,
        storage_options: dict | None,
        roots: list[str] | None,
    ) -> tuple[list[str], list[tuple[str, str, str]], int]:
        """(fragment metadata as JSON, failures as (media_id, reason, detail), rows written)."""
        import lance.fragment
        import numpy as np

        from fusion.encoders import extract

        enc = self.encoder

        def load(media_id: str, payload: Any) -> Any:
            if isinstance(payload, Path):
                return verified_file(media_id, str(payload), enc.modality, roots)
            return payload

        ids: list[str] = []
        vecs: list[np.ndarray] = []
        failures: list[tuple[str, str, str]] = []
        for batch in extract(enc, shard, progress=False, load=load):
            ids.extend(batch.media_ids)
            if len(batch.media_ids):
                vecs.append(batch.vectors)
            failures += [(f.media_id, f.reason, f.detail) for f in batch.failures]
        if not ids:
            return [], failures, 0
        table = pa.table(
            [
                pa.array(ids),
                vectors_to_arrow(np.concatenate(vecs)),
                pa.array([enc.fingerprint] * len(ids)),
                pa.array([enc.spec.name] * len(ids)),
            ],
            schema=schemas.latents(enc.dim),
        )
        fragments = lance.fragment.write_fragments(table, uri, storage_options=storage_options)
        return [json.dumps(f.to_json()) for f in fragments], failures, len(ids)


def _worker_env(workers: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _FORWARDED or k.startswith(_FORWARDED_PREFIXES)}
    if "FUSEMIX_TORCH_THREADS" not in env:  # the cores split among the workers on one machine
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env["FUSEMIX_TORCH_THREADS"] = str(max(1, cores // max(1, workers)))
    env.setdefault("FUSEMIX_DECODE_WORKERS", "1")
    return env


def ray_session(address: str | None, workers: int):
    """Connects to Ray (`address`, else $RAY_ADDRESS, else a new local Ray with `workers` CPUs).
    Returns True when this call started it (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=max(1, workers), **kwargs)
    return True


@dataclass(frozen=True)
class RayJob:
    """How a Ray extraction runs: `workers` actors at `address` (None: $RAY_ADDRESS, else a local Ray),
    encoders on `device` (`gpus_per_worker` GPUs each), shards of `shard_size` items, `max_retries`
    restarts of a dead worker and retries of its shards."""

    workers: int = 2
    address: str | None = None
    device: str = "cpu"
    cache_dir: str | None = None
    shard_size: int = 256
    gpus_per_worker: float = 0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")


def run_extraction_ray(
    lake: Lake,
    dataset: str,
    spec: EncoderSpec,
    *,
    roots: Sequence[str | os.PathLike] | None = None,
    on_shard: Callable[[dict], None] | None = None,
    **job: Any,
) -> dict:
    """Encodes what is missing on Ray and commits once (see the module docstring). `job`: the fields
    of RayJob (workers, address, device, cache_dir, shard_size, gpus_per_worker, max_retries). Returns
    the counts of pipelines.extract.run_extraction, plus `workers` and `shards`. `on_shard` is called
    after each finished shard with the progress and the workers' pids."""
    if job.get("cache_dir") is not None:
        job["cache_dir"] = str(job["cache_dir"])
    settings = RayJob(**job)
    with writing(lake.root):
        return _run(lake, dataset, spec, roots, settings, on_shard)


def _run(lake: Lake, dataset: str, spec: EncoderSpec, roots, job: RayJob, on_shard) -> dict:
    import ray

    from fusion.encoders import describe_encoder

    ref = describe_encoder(spec, cache_dir=Path(job.cache_dir) if job.cache_dir else None, device=job.device)
    info = EncoderInfo(spec, ref.fingerprint, ref.dim)
    lat_t = table_name("latents", dataset, spec.name)
    todo, stats = plan(lake, dataset, info)
    stats.update(workers=job.workers, shards=0)
    lake.create(
        lat_t, schemas.latents(info.dim)
    )  # the fragments are written into the table, which must exist
    t0 = time.perf_counter()
    fragments: list[str] = []
    failures: list[MediaError] = []
    if todo:
        started = ray_session(job.address, job.workers)
        try:
            fragments, failures, stats["shards"] = _encode_on_ray(
                ray, lake, dataset, info, todo, roots, job, on_shard
            )
        finally:
            if started:
                ray.shutdown()
    if fragments:
        stats["encoded"] = lake.commit_fragments(lat_t, fragments)
        stats["commits"] += 1
        stats["duplicates_deleted"] += lake.dedupe(lat_t, "media_id")
    stats["failed"] = quarantine_failures(lake, dataset, info, failures)
    return summary(lake, dataset, info, stats, t0)


def _encode_on_ray(
    ray, lake: Lake, dataset: str, info: EncoderInfo, todo: list[str], roots, job: RayJob, on_shard
):
    actor_cls = ray.remote(_EncoderWorker).options(
        num_cpus=1,
        num_gpus=job.gpus_per_worker,
        max_restarts=job.max_retries,
        max_task_retries=job.max_retries,
        runtime_env={"env_vars": _worker_env(job.workers)},
    )
    actors = [actor_cls.remote(info.spec, job.device, job.cache_dir) for _ in range(job.workers)]
    described = ray.get([a.describe.remote() for a in actors])
    pids = [pid for pid, _, _ in described]
    for _, fingerprint, dim in described:
        if (fingerprint, dim) != (info.fingerprint, info.dim):
            raise RuntimeError(
                f"encoder {info.spec.name}: a Ray worker built fingerprint {fingerprint} (dim {dim}), the "
                f"driver expects {info.fingerprint} (dim {info.dim}); the workers need the same weights, "
                "settings and device kind as this machine"
            )
    uri = lake.uri(table_name("latents", dataset, info.spec.name))
    media_t = table_name("media", dataset)
    root_list = [str(r) for r in roots] if roots is not None else None
    futures = []
    for i in range(0, len(todo), job.shard_size):
        shard = list(media_payloads(lake, media_t, todo[i : i + job.shard_size]))
        actor = actors[(i // job.shard_size) % job.workers]
        futures.append(actor.encode.remote(shard, uri, lake.options, root_list))
    fragments: list[str] = []
    failures: list[MediaError] = []
    done, remaining, encoded = 0, list(futures), 0
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        frags, fails, rows = ray.get(ready[0])
        fragments += frags
        failures += [MediaError(mid, reason, detail) for mid, reason, detail in fails]
        done += 1
        encoded += rows
        if on_shard is not None:
            on_shard({"shards_done": done, "shards": len(futures), "encoded": encoded, "worker_pids": pids})
    for actor in actors:
        ray.kill(actor)
    return fragments, failures, len(futures)
