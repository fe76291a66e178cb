"""Search in a trained FuseMix space: text, image or audio queries against the items of any side.

    fusemix search "a red apple" --experiment emoji-fusemix                 text -> media
    fusemix search --image cat.png --experiment emoji-fusemix --target text image -> captions

    searcher = Searcher(Lake(root), models_dir)          # caches spaces, encoders, Lance tables
    searcher.query("emoji-fusemix", "image", text="a red apple", k=10)
    searcher.query("emoji-fusemix", "text", image=png_bytes)
    searcher.media_bytes("emoji", media_id)              # (bytes, content type) of a stored item

A query is encoded by its side's frozen encoder (uploads are decoded under fusion.media's limits:
sniffed, size-, pixel- and duration-bounded, never read from a path), mapped into the shared space by
the experiment's model (pipelines.space), and searched in `embeddings__{experiment}__{target}`
(pipelines.embed): through its vector index when it has one, exactly otherwise. SearchError is a bad
request or a missing step (unknown experiment or side, empty query, embeddings not made yet);
fusion.media.MediaError is an upload that cannot be decoded: a service maps both to 4xx.

The checkpoint folder is `<FUSEMIX_HOME>/models/<experiment>/` (fusion.checkpoint); the embeddings
asset must have run for it (an experiment's `experiment_job` ends with it). Embeddings made by
another checkpoint, or a query encoder of another fingerprint, are refused.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lance
import numpy as np

from fusion.adapters import EncoderRef
from fusion.checkpoint import CONFIG
from fusion.encoders import EncoderSpec, FrozenEncoder, build_encoder, load_registry
from fusion.media import (
    DEFAULT_LIMITS,
    MediaError,
    MediaLimits,
    decode_image,
    probe,
    read_bytes,
    sniff_modality,
)
from pipelines.embed import embeddings_table, nearest
from pipelines.lake import Lake, sql_str
from pipelines.schemas import table_name
from pipelines.space import TEXT, SearchError, Space, check_name, load_space

__all__ = ["MediaError", "SearchError", "Searcher", "default_target", "format_results"]


def format_results(results: list[dict], max_captions: int = 2, width: int = 90) -> str:
    """Printable lines: rank, score, media id, path, then up to `max_captions` captions; a text item
    (Searcher.query on the text side) shows its text where a media item shows its path."""
    if not results:
        return "no results"
    lines = []
    for r in results:
        if r.get("modality") == "text" and r.get("text") is not None:
            text = r["text"] if len(r["text"]) <= width else r["text"][: width - 1] + "…"
            lines.append(f"{r['rank']:>2}. {r['score']:+.4f}  {r['media_id']}  {text}")
            continue
        where = r["path"] or "(inline)"
        lines.append(f"{r['rank']:>2}. {r['score']:+.4f}  {r['media_id']}  {where}")
        for cap in r["captions"][:max_captions]:
            lines.append(f"      - {cap if len(cap) <= width else cap[: width - 1] + '…'}")
        if len(r["captions"]) > max_captions:
            lines.append(f"      (+{len(r['captions']) - max_captions} more captions)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- Searcher

# At most this many results per query: a page of them, not a dump of the table.
MAX_K = 1000
# A media id is a content hash (fusion.data.canonical.content_id); anything else is no item.
_MEDIA_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$")
# Formats a browser shows as they are; other images (SVG, BMP, TIFF) are served rasterised to PNG.
_IMAGE_TYPES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def _audio_type(data: bytes) -> str | None:
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "audio/wav"
    if data.startswith(b"fLaC"):
        return "audio/flac"
    if data.startswith(b"OggS"):
        return "audio/ogg"
    if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "audio/aiff"
    if sniff_modality(data) == "audio":  # ID3 or an MPEG frame header
        return "audio/mpeg"
    return None


def servable(
    data: bytes, modality: str, media_id: str = "", limits: MediaLimits | None = None
) -> tuple[bytes, str]:
    """(bytes, content type) a browser can show without running anything: PNG, JPEG, GIF and WebP as
    they are; every other image (SVG above all, which can carry script) decoded with fusion.media's
    sanitiser and limits and re-encoded as PNG; audio as it is, typed by its magic bytes. Raises
    MediaError for anything else."""
    if modality == "image":
        for magic, kind in _IMAGE_TYPES:
            if data.startswith(magic):
                return data, kind
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return data, "image/webp"
        out = io.BytesIO()
        decode_image(data, media_id, limits).save(out, format="PNG")
        return out.getvalue(), "image/png"
    if modality == "audio":
        kind = _audio_type(data)
        if kind is None:
            raise MediaError(media_id, "unsupported_format", "not a sound format a browser plays")
        return data, kind
    raise MediaError(media_id, "unsupported_format", f"a {modality} item has no file to serve")


def default_target(sides: Iterable[str], query_side: str) -> str:
    """The side a query searches when none is named: text for an image or audio query (its
    captions), the first media side for a text query (the other side of a two-sided space)."""
    sides = list(sides)
    if query_side != TEXT:
        return TEXT
    media = [s for s in sides if s != TEXT]
    if not media:
        raise SearchError(f"a space with sides {sides} has no media side to search")
    return media[0]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside (unchanged for None)."""
    import torch

    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class _Table:
    """An opened embeddings table, checked against the checkpoint that maps the queries."""

    ds: lance.LanceDataset
    version: int
    model_hash: str
    indexed: bool
    rows: int
    checked: float


class Searcher:
    """Queries the embeddings tables of the experiments in `models_dir` (see the module docstring).

    Caches what a query needs: each experiment's space (reloaded when its checkpoint changes), one
    built encoder per encoder name, and each opened embeddings table (re-opened at most every
    `refresh_s` seconds when a newer Lance version was written). `registry`: the encoder registry
    (default configs/encoders.yaml); `datasets` and `data_cache`: the dataset registry and the data
    cache, which say where a dataset's files may lie (media_bytes; defaults configs/datasets.yaml and
    <FUSEMIX_HOME>/cache/data); `limits`: what an upload may be (fusion.media); `query_threads`:
    torch threads while one query is encoded (one: a single item gains nothing from more, and on
    shared cores more threads only wait on each other; None leaves torch's setting). Not
    thread-safe: serve one query at a time."""

    def __init__(
        self,
        lake: Lake,
        models_dir: str | Path,
        registry: Mapping[str, EncoderSpec] | None = None,
        *,
        datasets: Mapping | None = None,
        data_cache: str | Path | None = None,
        limits: MediaLimits | None = None,
        query_threads: int | None = 1,
        refresh_s: float = 5.0,
    ) -> None:
        self.lake = lake
        self.models_dir = Path(models_dir)
        self.limits = limits or DEFAULT_LIMITS
        self.query_threads = query_threads
        self.refresh_s = refresh_s
        self._registry = dict(registry) if registry is not None else None
        self._datasets = dict(datasets) if datasets is not None else None
        self._data_cache = Path(data_cache) if data_cache is not None else None
        self._spaces: dict[str, tuple[tuple, Space]] = {}
        self._encoders: dict[str, FrozenEncoder] = {}
        self._tables: dict[tuple[str, str], _Table] = {}

    # -- spaces, encoders, tables ---------------------------------------------------------------

    def _stamp(self, experiment: str) -> tuple:
        directory = self.models_dir / experiment
        stamp = []
        for path in sorted([directory / CONFIG, *directory.glob("*.safetensors")]):
            try:
                st = path.stat()
            except OSError:
                continue
            stamp.append((path.name, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def space(self, experiment: str) -> Space:
        """The experiment's space, loaded again when its checkpoint's files changed."""
        check_name(experiment)
        stamp = self._stamp(experiment)
        cached = self._spaces.get(experiment)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        space = load_space(self.models_dir, experiment)
        self._spaces[experiment] = (stamp, space)
        return space

    def registry(self) -> Mapping[str, EncoderSpec]:
        if self._registry is None:
            self._registry = load_registry()
        return self._registry

    def encoder(self, space: Space, side: str) -> FrozenEncoder:
        """The frozen encoder of `side` (built once per name), checked against the checkpoint."""
        space.require_side(side)
        name = space.sides[side]
        enc = self._encoders.get(name)
        if enc is None:
            registry = self.registry()
            if name not in registry:
                raise SearchError(
                    f"experiment {space.experiment!r} uses {side} encoder {name!r}, which is not in the encoder registry"
                )
            enc = self._encoders[name] = build_encoder(registry[name])
        space.check_encoder(
            side, EncoderRef(enc.name, enc.fingerprint, enc.dim), f"{side} encoder {name!r} here"
        )
        return enc

    def _table(self, space: Space, side: str) -> _Table:
        """`side`'s embeddings table, opened (again after refresh_s when newer) and checked: made by
        this checkpoint, in its width."""
        key = (space.experiment, side)
        now = time.monotonic()
        entry = self._tables.get(key)
        if (
            entry is not None
            and entry.model_hash == space.model_hash
            and now - entry.checked < self.refresh_s
        ):
            return entry
        name = embeddings_table(space.experiment, side)
        try:
            ds = self.lake.open(name)
        except LookupError as err:
            raise SearchError(
                f"experiment {space.experiment!r} has no {side} embeddings yet (table {name!r}); "
                f"materialise its embeddings asset (fusemix materialize experiment --partition {space.experiment})"
            ) from err
        if entry is not None and entry.version == ds.version and entry.model_hash == space.model_hash:
            entry.checked = now
            return entry
        width = ds.schema.field("vector").type.list_size if "vector" in ds.schema.names else None
        stale = width != space.dim or ds.count_rows(f"model_hash != {sql_str(space.model_hash)}") > 0
        if stale:
            raise SearchError(
                f"the {side} embeddings of experiment {space.experiment!r} were made by another checkpoint "
                f"than the one in {space.directory}; materialise its embeddings asset again"
            )
        entry = _Table(ds, ds.version, space.model_hash, ds.has_index, ds.count_rows(), now)
        self._tables[key] = entry
        return entry

    # -- the API --------------------------------------------------------------------------------

    def experiments(self) -> list[dict]:
        """The experiments with a trained model and at least one embeddings table: name, sides (side
        -> encoder), datasets (dataset -> media side), counts (rows per side, 0 where not made yet),
        dim, method, and ready (every side's table present and made by the current checkpoint)."""
        if not self.models_dir.is_dir():
            return []
        out = []
        for folder in sorted(p for p in self.models_dir.iterdir() if (p / CONFIG).is_file()):
            try:
                space = self.space(folder.name)
            except SearchError:
                continue  # an invalid name, a checkpoint without a record, a half-written one
            counts = {s: self.lake.count(embeddings_table(space.experiment, s)) for s in space.sides}
            present = [s for s in space.sides if self.lake.exists(embeddings_table(space.experiment, s))]
            if not present:
                continue
            ready = len(present) == len(space.sides)
            for side in present:
                try:
                    self._table(space, side)
                except SearchError:
                    ready = False
            out.append(
                {
                    "name": space.experiment,
                    "sides": dict(space.sides),
                    "datasets": dict(space.datasets),
                    "counts": counts,
                    "dim": space.dim,
                    "method": space.record.get("method", "adapters"),
                    "ready": ready,
                }
            )
        return out

    def default_target(self, experiment: str, query_side: str) -> str:
        return default_target(self.space(experiment).sides, query_side)

    def embed_query(self, space: Space, side: str, payload) -> np.ndarray:
        """One query -> float32 [dim] in the space: text (a str), or the bytes of an image or audio
        file, decoded under `limits` after its magic bytes say it is that modality."""
        encoder = self.encoder(space, side)
        if side == TEXT:
            if not isinstance(payload, str):
                raise SearchError(f"a text query is a string, not {type(payload).__name__}")
            item = payload.strip()
            if not item:
                raise SearchError("the query is empty")
            if len(item) > self.limits.max_caption_chars:
                raise SearchError(
                    f"the query has {len(item)} characters; at most {self.limits.max_caption_chars}"
                )
        else:
            if not isinstance(payload, bytes | bytearray | memoryview):
                # Never a str: that would be read as a path on this machine.
                raise SearchError(f"an {side} query is the file's bytes, not {type(payload).__name__}")
            data = read_bytes(bytes(payload), "query", self.limits)
            found = sniff_modality(data)
            if found != side:
                raise MediaError(
                    "query",
                    "unsupported_format",
                    f"expected {side}, got {found or 'a format this service does not read'}",
                )
            if side == "image":
                item = decode_image(data, "query", self.limits)
            else:
                probe(data, "audio", "query", self.limits)  # decodable within the limits, not silent
                item = data
        with torch_threads(self.query_threads):
            latent = encoder.encode([item])  # [1, d_side]
            return space.embed(side, latent)[0]  # [D]

    def query(
        self,
        experiment: str,
        target: str,
        *,
        text: str | None = None,
        image: bytes | None = None,
        audio: bytes | None = None,
        k: int = 10,
        dataset: str | None = None,
    ) -> list[dict]:
        """The k items of side `target` nearest to the query (exactly one of text, image, audio),
        best first, optionally of one `dataset`. Each: rank (1-based), media_id, dataset, modality,
        score (cosine in the shared space), path (media items), text (text items), captions (the
        texts paired with a media item). SearchError for a bad request, MediaError for a bad upload."""
        given = [(s, v) for s, v in (("text", text), ("image", image), ("audio", audio)) if v is not None]
        if len(given) != 1:
            raise SearchError(f"give exactly one query (text, image or audio), got {len(given)}")
        (side, payload) = given[0]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise SearchError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}")
        space = self.space(experiment)
        space.require_side(target)
        if side not in space.sides:
            raise SearchError(
                f"experiment {experiment!r} cannot be queried by {side}; its sides are {sorted(space.sides)}"
            )
        if dataset is not None and dataset not in space.datasets_of(target):
            raise SearchError(
                f"experiment {experiment!r} has no {target} items of dataset {dataset!r}; "
                f"its datasets are {space.datasets_of(target)}"
            )
        entry = self._table(space, target)
        q = self.embed_query(space, side, payload)
        rows = nearest(entry.ds, q, k, indexed=entry.indexed, rows=entry.rows, dataset=dataset)
        return [
            {
                "rank": i + 1,
                "media_id": r["media_id"],
                "dataset": r["dataset"],
                "modality": target,
                "score": r["score"],
                "path": r["path"],
                "text": r["text"],
                "captions": list(r["captions"] or []),
            }
            for i, r in enumerate(rows)
        ]

    def _dataset_spec(self, dataset: str):
        if self._datasets is None:
            from pipelines.registries import load_datasets

            self._datasets = load_datasets()
        spec = self._datasets.get(dataset)
        if spec is None:
            raise SearchError(f"unknown dataset {dataset!r}; known: {sorted(self._datasets)}")
        return spec

    def media_bytes(self, dataset: str, media_id: str) -> tuple[bytes, str]:
        """(bytes, content type) of a stored media item, for a thumbnail or a player: only an id of
        media__{dataset}, read from its inline bytes or its file, which must lie under the dataset's
        folders and still hash to the id (pipelines.extract.verified_file). Images other than PNG,
        JPEG, GIF and WebP (SVG above all) are rasterised to PNG (`servable`). SearchError for an
        unknown dataset or id or a text item; MediaError for a file that moved, changed or is bad."""
        from pipelines.extract import verified_file
        from pipelines.ingest import dataset_roots

        if (
            not isinstance(dataset, str)
            or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", dataset)
            or "__" in dataset
        ):
            raise SearchError(f"invalid dataset name {dataset!r}")
        if not isinstance(media_id, str) or not _MEDIA_ID.match(media_id):
            raise SearchError(f"invalid media id {media_id!r}")
        spec = self._dataset_spec(dataset)
        media_t = table_name("media", dataset)
        if not self.lake.exists(media_t):
            raise SearchError(f"dataset {dataset!r} is not ingested")
        columns = [
            c for c in ("media_id", "modality", "path", "data") if c in self.lake.open(media_t).schema.names
        ]
        rows = self.lake.read(media_t, columns, f"media_id = {sql_str(media_id)}").to_pylist()
        if not rows:
            raise SearchError(f"no media item {media_id!r} in dataset {dataset!r}")
        row = rows[0]
        modality = row.get("modality")
        if modality not in ("image", "audio"):
            raise SearchError(f"item {media_id!r} of {dataset!r} is a {modality} item, not a media file")
        if row.get("data") is not None:
            data = read_bytes(bytes(row["data"]), media_id, self.limits)
        elif row.get("path"):
            cache = self._data_cache
            if cache is None:
                from fusion.paths import cache_dir

                cache = cache_dir("data")
            found = verified_file(media_id, row["path"], modality, dataset_roots(spec, cache))
            if isinstance(found, Path):  # a format decoded by its name (.svgz): rasterised
                out = io.BytesIO()
                decode_image(found, media_id, self.limits).save(out, format="PNG")
                return out.getvalue(), "image/png"
            data = found
        else:
            raise SearchError(f"item {media_id!r} of {dataset!r} has neither a file nor inline bytes")
        return servable(data, modality, media_id, self.limits)
