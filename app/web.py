"""The search service and page (`fusemix serve`): a FastAPI app over a `pipelines.search.Searcher`.

    fusemix serve [--host 127.0.0.1] [--port 8000] [--max-upload-mb 16]     then open http://127.0.0.1:8000

    GET  /                                  the page (app/static: HTML, CSS and JS, nothing from elsewhere)
    GET  /api/experiments                   {"experiments": [...], "max_upload_bytes": n, "max_k": n}
    POST /api/search                        JSON {"experiment", "target", "text", "k"?, "dataset"?}, or
                                            multipart: experiment, target, k?, dataset?, modality?, file
    GET  /api/media/{dataset}/{media_id}    the bytes of one ingested item, with its content type

Every error is JSON {"error": message, "reason": code} with a 4xx status: 404 for an unknown
experiment, route or media item, 400 for a malformed request or a side the experiment lacks, 413 for
an upload over the size limit (refused from its Content-Length, or as soon as the body passes the
limit, never read whole), 415 for a file that is not an image or a sound, or not the kind it claims,
and 422 for a file that does not decode within fusion.media's limits (truncated, empty, decompression
bomb, silent, too long): the searcher decodes uploads with fusion.media, under its `limits`.

Searches run one at a time (the encoders are not shared across threads) in a worker thread, so the
server keeps answering the page and media while a search runs.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from fusion.media import REASONS, MediaError, sniff_modality
from pipelines.search import Searcher, SearchError

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024
# Room for the multipart boundaries and the small form fields around the file.
_FORM_OVERHEAD = 64 * 1024
UPLOAD_MODALITIES = ("image", "audio")

# The page loads only what this server serves; uploads are previewed through blob: URLs.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# A media item opened on its own (an SVG could carry script) runs nothing and loads nothing.
MEDIA_CSP = "default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'; sandbox"
_SERVABLE = re.compile(r"^(image/(png|jpeg|gif|webp|bmp|tiff)|audio/[a-z0-9.+-]+)$")
# Dataset names and media ids are short plain names (ids are hex digests); anything else is no item.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ApiError(HTTPException):
    """An HTTP error with a short machine-readable reason; answered as {"error", "reason"}."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        # A refused upload may be unread: closing the connection spares reading (and discarding) the rest.
        headers = {"connection": "close"} if status == 413 else None
        super().__init__(status_code=status, detail=message, headers=headers)
        self.reason = reason


class TextSearch(BaseModel):
    """The JSON body of a text search."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field(description="experiment name, as /api/experiments lists it")
    target: str = Field(description="the side to search: image, audio or text")
    text: str = Field(description="the query")
    k: int = Field(10, description="how many results")
    dataset: str | None = Field(None, description="search only this dataset of the target side")


# Status of each fusion.media refusal; every other reason (undecodable, empty, bomb, silent, ...) is 422.
_MEDIA_STATUS = {"too_large": 413, "unsupported_format": 415}


def _media_error(err: MediaError, name: str = "The query") -> ApiError:
    detail = f" ({err.detail})" if err.detail else ""
    message = f"{name} was refused: {REASONS[err.reason]}{detail}"
    return ApiError(_MEDIA_STATUS.get(err.reason, 422), message, err.reason)


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware: refuses request bodies over `max_body` bytes (from Content-Length before
    anything is read, else as soon as the stream passes it) and adds the security headers."""

    def __init__(self, app, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _send_json(send, 413, _too_large(self.max_body, length.decode("latin-1")))
            return
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
            return message

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except _BodyTooLarge:
            if started:
                raise
            await _send_json(send, 413, _too_large(self.max_body, None))


def _too_large(limit: int, length: str | None) -> dict:
    size = f" ({length} bytes)" if length and length.isdigit() else ""
    return {
        "error": f"The upload is too large{size}: the limit is {_human(limit)} including the form",
        "reason": "too_large",
    }


async def _send_json(send, status: int, body: dict) -> None:
    resp = JSONResponse(body, status_code=status, headers={"connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


def create_app(
    searcher: Searcher,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_k: int = 100,
    allowed_hosts: Sequence[str] | None = None,
    list_ttl_s: float = 5.0,
) -> FastAPI:
    """The service over `searcher` (a pipelines.search.Searcher; give it fusion.media limits with
    max_bytes = max_upload_bytes so that both agree). Uploads over `max_upload_bytes` are refused
    (413); at most `max_k` results a query. `allowed_hosts` (e.g. ["127.0.0.1", "localhost"])
    refuses requests for other Host names, which a DNS-rebinding page would send; None accepts any.
    The experiment list that requests are checked against is at most `list_ttl_s` seconds old."""
    lock = threading.Lock()  # one call at a time: the Searcher and its encoders are not thread-safe
    listed: dict[str, Any] = {"at": -1e9, "value": []}
    app = FastAPI(title="FuseMix search", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.add_middleware(_Guard, max_body=max_upload_bytes + _FORM_OVERHEAD)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = getattr(exc, "reason", None) or {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "bad_request"
        )
        return JSONResponse(
            {"error": str(exc.detail), "reason": reason}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _describe(exc.errors()), "reason": "bad_request"}, status_code=400)

    def experiments(fresh: bool = True) -> list[dict]:
        with lock:
            if fresh or time.monotonic() - listed["at"] > list_ttl_s:
                listed["value"], listed["at"] = searcher.experiments(), time.monotonic()
            return listed["value"]

    def find(name: str, target: str, query_modality: str) -> dict:
        found = {e["name"]: e for e in experiments(fresh=False)}
        if name not in found:  # perhaps trained since the list was read
            found = {e["name"]: e for e in experiments()}
        if name not in found:
            known = ", ".join(sorted(found)) or "none yet"
            raise ApiError(
                404, f"There is no experiment {name!r} to search (available: {known})", "unknown_experiment"
            )
        sides = sorted(found[name].get("sides") or {})
        if target not in sides:
            raise ApiError(
                400,
                f"Experiment {name!r} has no {target!r} side to search; its sides are {', '.join(sides)}",
                "unknown_side",
            )
        if query_modality not in sides:
            raise ApiError(
                400,
                f"Experiment {name!r} cannot search by {query_modality}; its sides are {', '.join(sides)}",
                "wrong_modality",
            )
        return found[name]

    def check(experiment: str, target: str, k: int, dataset: str | None, modality: str) -> None:
        if not 1 <= k <= max_k:
            raise ApiError(400, f"k must be between 1 and {max_k}, got {k}", "bad_request")
        info = find(experiment, target, modality)
        if dataset is not None and dataset not in (info.get("datasets") or {}):
            raise ApiError(404, f"Experiment {experiment!r} has no dataset {dataset!r}", "unknown_dataset")

    def run_query(
        experiment: str, target: str, k: int, dataset: str | None, label: str, **query: Any
    ) -> list[dict]:
        try:
            with lock:
                results = searcher.query(experiment, target, k=k, dataset=dataset, **query)
        except MediaError as err:
            raise _media_error(err, label) from err
        except SearchError as err:
            raise ApiError(400, str(err), "search_error") from err
        return [_public(r) for r in results]

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"content-security-policy": PAGE_CSP})

    @app.get("/api/experiments")
    async def list_experiments() -> dict:
        return {
            "experiments": await run_in_threadpool(experiments),
            "max_upload_bytes": max_upload_bytes,
            "max_k": max_k,
        }

    @app.post("/api/search")
    async def search(request: Request) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if kind == "application/json":
                return await _json_search(request)
            if kind == "multipart/form-data":
                return await _upload_search(request)
        except _BodyTooLarge:
            raise ApiError(
                413, _too_large(max_upload_bytes + _FORM_OVERHEAD, None)["error"], "too_large"
            ) from None
        raise ApiError(
            415,
            "Send a text query as application/json or a file as multipart/form-data",
            "unsupported_media_type",
        )

    async def _json_search(request: Request) -> dict:
        try:
            body = TextSearch.model_validate_json(await request.body())
        except ValidationError as err:
            raise ApiError(400, _describe(err.errors()), "bad_request") from err
        text = body.text.strip()
        if not text:
            raise ApiError(400, "The query is empty: type some text or choose a file", "empty_query")
        await run_in_threadpool(check, body.experiment, body.target, body.k, body.dataset, "text")
        results = await run_in_threadpool(
            run_query, body.experiment, body.target, body.k, body.dataset, "The query", text=text
        )
        return {"query": {"modality": "text", "text": text}, "results": results}

    async def _upload_search(request: Request) -> dict:
        form = await request.form(max_files=1, max_fields=8, max_part_size=16 * 1024)
        try:
            fields = {name: form.get(name) for name in ("experiment", "target", "k", "dataset", "modality")}
            if any(isinstance(v, UploadFile) for v in fields.values()):
                raise ApiError(400, "Only the field 'file' may be a file", "bad_request")
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "Choose a file to upload (form field 'file')", "bad_request")
            for name in ("experiment", "target"):
                if not fields[name]:
                    raise ApiError(400, f"The form field {name!r} is required", "bad_request")
            try:
                k = int(fields["k"] or 10)
            except ValueError:
                raise ApiError(400, f"k must be a whole number, got {fields['k']!r}", "bad_request") from None
            # Read one byte past the limit: no more is held whatever the client claims the size is.
            data = await upload.read(max_upload_bytes + 1)
            name = upload.filename or "the file"
        finally:
            await form.close()
        if len(data) > max_upload_bytes:
            raise ApiError(
                413, f"{name} is larger than the upload limit of {_human(max_upload_bytes)}", "too_large"
            )
        if not data:
            raise ApiError(422, f"{name} is empty (0 bytes)", "empty")
        modality = _upload_modality(data, fields["modality"], name)
        experiment, target, dataset = fields["experiment"], fields["target"], fields["dataset"] or None
        await run_in_threadpool(check, experiment, target, k, dataset, modality)
        results = await run_in_threadpool(run_query, experiment, target, k, dataset, name, **{modality: data})
        return {
            "query": {"modality": modality, "filename": upload.filename, "bytes": len(data)},
            "results": results,
        }

    @app.get("/api/media/{dataset}/{media_id}")
    def media(dataset: str, media_id: str) -> Response:
        if not (_NAME.match(dataset) and _NAME.match(media_id)):
            raise ApiError(404, "No such media item", "not_found")
        try:
            with lock:
                data, content_type = searcher.media_bytes(dataset, media_id)
        except (SearchError, LookupError, FileNotFoundError) as err:
            raise ApiError(404, f"No media item {media_id!r} in dataset {dataset!r}", "not_found") from err
        except MediaError as err:  # its file moved, changed or went bad since ingestion
            message = f"Media item {media_id!r} of {dataset!r} cannot be served: {REASONS[err.reason]}"
            raise ApiError(404, message, err.reason) from err
        headers = {"content-security-policy": MEDIA_CSP, "cache-control": "private, max-age=3600"}
        if not _SERVABLE.match(content_type or ""):
            content_type = "application/octet-stream"
            headers["content-disposition"] = "attachment"
        return Response(data, media_type=content_type, headers=headers)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _upload_modality(data: bytes, declared: str | None, name: str) -> str:
    """image or audio: what the bytes are (their magic numbers), which must match what the form
    says the file is, if it says. 415 for a file that is neither or not what it claims."""
    declared = declared or None
    if declared is not None and declared not in UPLOAD_MODALITIES:
        raise ApiError(400, f"modality must be image or audio, got {declared!r}", "bad_request")
    sniffed = sniff_modality(data)
    if sniffed is None and declared is None:
        raise ApiError(
            415, f"{name} is neither an image nor a sound file this service reads", "unsupported_format"
        )
    if sniffed is not None and declared is not None and sniffed != declared:
        raise ApiError(415, f"{name} was sent as {declared} but its content is {sniffed}", "wrong_modality")
    return sniffed or declared


def _public(result: dict) -> dict:
    """A result as JSON: the searcher's fields plus media_url for items the media endpoint serves."""
    out = {k: v for k, v in result.items() if k != "path"}
    out["score"] = float(out["score"])
    out["rank"] = int(out["rank"])
    if result.get("modality") in UPLOAD_MODALITIES and result.get("dataset"):
        out["media_url"] = (
            f"/api/media/{quote(result['dataset'], safe='')}/{quote(result['media_id'], safe='')}"
        )
    return out


def _human(n: int) -> str:
    """A size as people read it: 900 bytes, 64 KiB, 16 MiB."""
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB".replace(".0 MiB", " MiB")


def _describe(errors: Sequence[dict]) -> str:
    """Pydantic's validation errors as one sentence: 'text: Field required; k: ...'."""
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "Bad request: " + "; ".join(parts)
