"""Decode media payloads (images, audio) into arrays the encoders take, refusing bad input with a typed error.

Every failure is a `MediaError` with a short machine-readable `reason` (the quarantine reason at ingest)
and a human `detail`. Limits (`MediaLimits`) guard against files too large, decompression bombs and
absurd durations before any large buffer is allocated; `probe` also refuses silent audio.
A reference that is a URL (http://, s3://, file://, data: ...) is refused, never fetched.

Images: PNG, JPEG, WebP, GIF (first frame), BMP, TIFF through Pillow, and SVG through resvg-py,
rendered to `svg_size` pixels on the long side. EXIF orientation is applied and alpha is composited
on white, so the result is always an RGB `PIL.Image.Image`.

Audio: WAV, FLAC, OGG/Vorbis and MP3 through soundfile (libsndfile >= 1.1 reads MP3), mixed to mono
and resampled with scipy.signal.resample_poly (polyphase, Kaiser-windowed FIR).

A reference (`ref`) is either the bytes of the file or a path (`str` or `Path`).

    from fusion.media import decode_image, decode_audio, probe
    img = decode_image("cat.jpg")                       # RGB PIL image
    wav = decode_audio("dog.flac", sample_rate=16000)   # float32 [T]
"""

from __future__ import annotations

import base64
import gzip
import io
import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps, UnidentifiedImageError

REASONS = {
    "missing": "the file does not exist",
    "unreadable": "the file cannot be read",
    "empty": "the payload is empty",
    "undecodable": "the payload cannot be decoded",
    "unsupported_format": "the format is not supported",
    "too_large": "the payload is larger than the size limit",
    "decompression_bomb": "the decoded size exceeds the pixel limit (possible decompression bomb)",
    "too_long": "the audio is longer than the duration limit",
    "too_short": "the audio is shorter than the duration limit",
    "outside_root": "the path leaves the dataset root",
    "url": "the path is a URL; fetch the file and give its local path",
    "silent": "the audio is silent (its peak is below the level limit)",
    "changed": "the file's content changed after ingestion (its content id no longer matches); re-ingest it",
}

# scheme://... (http, https, s3, gs, file, ftp, hf ...) or a data: URI; "C:/x" is a Windows path instead.
_URL = re.compile(r"^\s*(?:[A-Za-z][A-Za-z0-9+.\-]+://|data:[\w.+\-/]*[;,])", re.IGNORECASE)

# Formats Pillow may hand back; anything else (PSD, ICO, EPS, ...) is refused rather than half-supported.
# MPO is what many phone cameras write: a JPEG with extra frames.
_PIL_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"}


class MediaError(Exception):
    """A media item that cannot be used, with a short `reason` code (see REASONS) and a detail."""

    def __init__(self, media_id: str, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown MediaError reason {reason!r}; expected one of {sorted(REASONS)}")
        self.media_id = media_id
        self.reason = reason
        self.detail = detail
        super().__init__(str(self))

    def __str__(self) -> str:
        who = f"Media item {self.media_id!r}" if self.media_id else "Media item"
        tail = f": {self.detail}" if self.detail else ""
        return f"{who} was refused because {REASONS[self.reason]} [{self.reason}]{tail}"

    def __reduce__(self):  # keep it picklable across process pools
        return (MediaError, (self.media_id, self.reason, self.detail))


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on what is decoded. Sizes in bytes, pixels (width*height) and seconds."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_audio_seconds: float = 600.0
    min_audio_seconds: float = 0.05
    svg_size: int = 256  # long side, in pixels, of a rendered SVG
    max_svg_pixels: int = 4_000_000  # a rendered SVG larger than this is refused
    min_audio_peak: float = 10 ** (-70 / 20)  # peak below -70 dBFS is silence; 0 turns the check off
    # Characters in one caption. The default corpus's longest (an openclipart title, description and
    # tags) has 960; a longer one is pasted junk rather than a description.
    max_caption_chars: int = 2000


DEFAULT_LIMITS = MediaLimits()

Ref = bytes | bytearray | memoryview | str | Path


# ----------------------------------------------------------------------------------------------- bytes


def is_url(ref: object) -> bool:
    """True for a string that is a URL (scheme://... or data:...) rather than a file path."""
    return isinstance(ref, str) and _URL.match(ref) is not None


def resolve_under(root: str | Path, rel: str | Path, media_id: str = "") -> Path:
    """Resolves `rel` against `root` (following symlinks) and checks the result stays inside root.

    Raises MediaError("outside_root") for absolute paths, `..` escapes and symlinks pointing out,
    and MediaError("url") for a URL.
    """
    root_r = Path(root).resolve()
    rel_s = str(rel)
    if not rel_s.strip():
        raise MediaError(media_id, "missing", "empty path")
    if is_url(rel_s):
        raise MediaError(media_id, "url", f"{rel_s[:200]!r}")
    if os.path.isabs(rel_s) or re.match(r"^[A-Za-z]:[\\/]", rel_s):
        raise MediaError(media_id, "outside_root", f"absolute path {rel_s!r} is not allowed")
    try:
        target = (root_r / rel_s).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL byte in the name ...
        raise MediaError(media_id, "unreadable", f"{rel_s!r} cannot be resolved: {e}") from None
    if not target.is_relative_to(root_r):
        raise MediaError(media_id, "outside_root", f"{rel_s!r} resolves to {target}, outside {root_r}")
    return target


def read_bytes(
    ref: Ref, media_id: str = "", limits: MediaLimits | None = None, *, root: str | Path | None = None
) -> bytes:
    """Returns the bytes of `ref` (bytes pass through), refusing missing, empty and too-large payloads.

    With `root`, a relative path is resolved under it and must stay inside it.
    """
    limits = limits or DEFAULT_LIMITS
    if isinstance(ref, bytes | bytearray | memoryview):
        data = bytes(ref)
        if not data:
            raise MediaError(media_id, "empty", "zero bytes")
        if len(data) > limits.max_bytes:
            raise MediaError(media_id, "too_large", f"{len(data)} bytes > limit {limits.max_bytes}")
        return data
    if not isinstance(ref, str | Path):
        raise TypeError(f"media reference must be bytes, str or Path, not {type(ref).__name__}")
    if is_url(ref):
        raise MediaError(media_id, "url", f"{str(ref)[:200]!r}")
    path = resolve_under(root, ref, media_id) if root is not None else Path(ref)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MediaError(media_id, "missing", f"no file at {path}") from None
    except (OSError, ValueError) as e:  # permission on a parent, symlink loop, name too long, NUL byte ...
        raise MediaError(media_id, "unreadable", f"{path}: {e}") from None
    if not path.is_file():
        raise MediaError(media_id, "unreadable", f"{path} is not a regular file")
    if st.st_size > limits.max_bytes:
        raise MediaError(media_id, "too_large", f"{path}: {st.st_size} bytes > limit {limits.max_bytes}")
    try:
        with open(path, "rb") as f:
            # Read one byte past the limit: a file that grew after stat() must not slip through.
            data = f.read(limits.max_bytes + 1)
    except OSError as e:
        raise MediaError(media_id, "unreadable", f"{path}: {e}") from None
    if not data:
        raise MediaError(media_id, "empty", f"{path} has zero bytes")
    if len(data) > limits.max_bytes:
        raise MediaError(media_id, "too_large", f"{path}: more than {limits.max_bytes} bytes")
    return data


def _ref_name(ref: Ref) -> str:
    return str(ref).lower() if isinstance(ref, str | Path) else ""


# ----------------------------------------------------------------------------------------------- sniffing


def _looks_like_svg(data: bytes) -> bool:
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<") and b"<svg" in head


def sniff_modality(data: bytes) -> str | None:
    """ "image", "audio" or None, from the magic bytes at the start of `data`."""
    if len(data) < 4:
        return None
    if data.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")):
        return "image"
    if data[:2] == b"BM" and len(data) >= 26 and data[6:10] == b"\0\0\0\0":  # BMP: reserved words are zero
        return "image"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image"
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "audio"
    if data.startswith((b"fLaC", b"OggS", b"ID3")) or (
        data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC")
    ):
        return "audio"
    # An MPEG audio frame header: 11 sync bits, then a version and layer that are not "reserved".
    if data[0] == 0xFF and (data[1] & 0xE0) == 0xE0 and (data[1] & 0x18) != 0x08 and (data[1] & 0x06) != 0:
        return "audio"
    if _looks_like_svg(data) or (data[:2] == b"\x1f\x8b" and _looks_like_svg(_gunzip(data, 8192, "", None))):
        return "image"
    return None


def _gunzip(data: bytes, max_out: int, media_id: str, limits: MediaLimits | None) -> bytes:
    """Gunzips at most `max_out` bytes; with `limits`, more than that is refused as a bomb."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
            out = g.read(max_out + 1)
    except (OSError, EOFError) as e:
        if limits is None:
            return b""
        raise MediaError(media_id, "undecodable", f"bad gzip stream: {e}") from None
    if limits is not None and len(out) > max_out:
        raise MediaError(media_id, "decompression_bomb", f"gzip payload inflates past {max_out} bytes")
    return out[:max_out]


# ----------------------------------------------------------------------------------------------- images


_SVG_NS = "http://www.w3.org/2000/svg"
_XLINK_NS = "http://www.w3.org/1999/xlink"
# Serialise sanitised SVGs with the usual prefixes rather than ns0:, once, not per (threaded) call.
ET.register_namespace("", _SVG_NS)
ET.register_namespace("xlink", _XLINK_NS)


def _svg_aspect(root: ET.Element) -> float | None:
    """Height/width of an SVG from the root's viewBox or width/height attributes, or None if unknown."""
    vb = root.get("viewBox")
    if vb:
        try:
            parts = [float(p) for p in re.split(r"[\s,]+", vb.strip())]
        except ValueError:
            parts = []
        if len(parts) == 4 and parts[2] > 0 and parts[3] > 0:
            return parts[3] / parts[2]
    num = re.compile(r"^\s*([0-9.eE+-]+)\s*(px|pt|mm|cm|in|pc)?\s*$")
    w, h = num.match(root.get("width", "")), num.match(root.get("height", ""))
    try:
        if w and h and (w.group(2) or "px") == (h.group(2) or "px") and float(w.group(1)) > 0:
            return float(h.group(1)) / float(w.group(1))
    except ValueError:
        return None
    return None


_PX_PER_UNIT = {"px": 1.0, "pt": 4 / 3, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0}


def _root_size_in_px(root: ET.Element) -> None:
    """Rewrites the root's width/height from absolute units (pt, pc, mm, cm, in) to px, at CSS's
    96 px per inch: resvg refuses such sizes ("invalid size"), a third of openclipart's drawings."""
    num = re.compile(r"^\s*([0-9.eE+-]+)\s*(pt|pc|mm|cm|in)\s*$")
    for attr in ("width", "height"):
        m = num.match(root.get(attr, ""))
        if m:
            try:
                root.set(attr, f"{float(m.group(1)) * _PX_PER_UNIT[m.group(2)]:.4f}")
            except ValueError:
                continue


def _sanitise_svg(root: ET.Element, media_id: str, limits: MediaLimits) -> None:
    """Removes references to files outside the SVG and refuses embedded rasters over the pixel limit.

    resvg would otherwise read any path an <image> names (a local file leaking into a dataset, or
    /dev/zero hanging ingest), and decode an embedded data: image of any declared size.
    """
    for elem in root.iter():
        for attr in [a for a in elem.attrib if a == "href" or a.endswith("}href")]:
            ref = elem.attrib[attr].strip()
            if ref.startswith("#"):
                continue
            if ref.startswith("data:"):
                header, _, payload = ref.partition(",")
                if header.startswith("data:image/") and ";base64" in header and "svg" not in header:
                    try:
                        with Image.open(io.BytesIO(base64.b64decode(payload, validate=False))) as inner:
                            w, h = inner.size
                    except Image.DecompressionBombError as e:
                        raise MediaError(
                            media_id, "decompression_bomb", f"SVG embeds an image: {e}"
                        ) from None
                    except Exception:  # Pillow raises many types for junk; resvg skips such images anyway
                        del elem.attrib[attr]
                        continue
                    if w * h > limits.max_pixels:
                        raise MediaError(media_id, "decompression_bomb", f"SVG embeds a {w}x{h} image")
                    continue
            del elem.attrib[attr]


def _decode_svg(data: bytes, media_id: str, limits: MediaLimits) -> Image.Image:
    import resvg_py

    if data[:2] == b"\x1f\x8b":  # .svgz
        data = _gunzip(data, limits.max_bytes, media_id, limits)
    try:
        # expat (>= 2.4) refuses billion-laughs entity expansion and never fetches external entities.
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise MediaError(media_id, "undecodable", f"SVG is not well-formed XML: {e}") from None
    if root.tag not in ("svg", f"{{{_SVG_NS}}}svg"):
        raise MediaError(media_id, "undecodable", f"root element is {root.tag!r}, not svg")
    _sanitise_svg(root, media_id, limits)
    _root_size_in_px(root)
    aspect = _svg_aspect(root)
    text = ET.tostring(root, encoding="unicode")
    size = limits.svg_size
    # Fix the long side so that the render is bounded however large the SVG claims to be.
    kwargs = {"height": size} if aspect is not None and aspect > 1 else {"width": size}
    try:
        png = resvg_py.svg_to_bytes(svg_string=text, background="#ffffff", **kwargs)
    except (ValueError, RuntimeError, OSError) as e:
        raise MediaError(media_id, "undecodable", f"SVG does not render: {e}") from None
    with Image.open(io.BytesIO(png)) as im:
        if im.width * im.height > limits.max_svg_pixels:
            raise MediaError(
                media_id,
                "decompression_bomb",
                f"SVG renders to {im.width}x{im.height} > {limits.max_svg_pixels}",
            )
        im.load()
        return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, compositing transparency on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow clips wide integer and float modes to 8 bits when converting; scale by the range instead.
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        im = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if im.mode == "P" or im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def decode_image(ref: Ref, media_id: str = "", limits: MediaLimits | None = None) -> Image.Image:
    """Decodes an image file or payload to an RGB PIL image (first frame, EXIF-oriented, alpha on white)."""
    limits = limits or DEFAULT_LIMITS
    data = read_bytes(ref, media_id, limits)
    if _looks_like_svg(data) or (data[:2] == b"\x1f\x8b" and _ref_name(ref).endswith(".svgz")):
        return _decode_svg(data, media_id, limits)
    if data[:2] == b"\x1f\x8b" and _looks_like_svg(_gunzip(data, 8192, media_id, None)):
        return _decode_svg(data, media_id, limits)
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise MediaError(media_id, "decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        kind = sniff_modality(data)
        reason = "unsupported_format" if kind == "audio" else "undecodable"
        raise MediaError(media_id, reason, "not an image Pillow recognises") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MediaError(media_id, "undecodable", f"{type(e).__name__}: {e}") from None
    with im:
        if im.format not in _PIL_FORMATS:
            raise MediaError(media_id, "unsupported_format", f"image format {im.format}")
        w, h = im.size
        if w <= 0 or h <= 0:
            raise MediaError(media_id, "empty", f"image of size {w}x{h}")
        if w * h > limits.max_pixels:
            raise MediaError(
                media_id, "decompression_bomb", f"{w}x{h} = {w * h} pixels > {limits.max_pixels}"
            )
        try:
            im.seek(0)
            im.load()
            out = ImageOps.exif_transpose(im)
            return _to_rgb(out if out is not None else im)
        except Image.DecompressionBombError as e:
            raise MediaError(media_id, "decompression_bomb", str(e)) from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            # Truncated or corrupt streams surface on load(), not on open().
            raise MediaError(media_id, "undecodable", f"{type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------- audio


# Beyond these, a small compressed file could inflate to gigabytes of samples (a silent 1000-channel FLAC).
MAX_AUDIO_CHANNELS = 32
MAX_SAMPLE_RATE = 384_000


def _load_audio(
    ref: Ref, media_id: str, limits: MediaLimits, max_seconds: float | None = None
) -> tuple[np.ndarray, int]:
    """Reads audio at its own rate, mixed to mono: (float32 [T], sample rate); at most max_seconds of it."""
    data = read_bytes(ref, media_id, limits)
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:
        reason = "unsupported_format" if sniff_modality(data) == "image" else "undecodable"
        raise MediaError(media_id, reason, f"soundfile cannot open it: {e}") from None
    with f:
        sr, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
        if sr <= 0 or channels <= 0:
            raise MediaError(media_id, "undecodable", f"sample rate {sr}, {channels} channels")
        if sr > MAX_SAMPLE_RATE or channels > MAX_AUDIO_CHANNELS:
            raise MediaError(
                media_id,
                "unsupported_format",
                f"{sr} Hz x {channels} channels (limits {MAX_SAMPLE_RATE} Hz, {MAX_AUDIO_CHANNELS} channels)",
            )
        if frames <= 0:
            raise MediaError(media_id, "empty", "no audio frames")
        seconds = frames / sr
        if seconds > limits.max_audio_seconds:
            raise MediaError(media_id, "too_long", f"{seconds:.1f} s > {limits.max_audio_seconds} s")
        if seconds < limits.min_audio_seconds:
            raise MediaError(media_id, "too_short", f"{seconds:.4f} s < {limits.min_audio_seconds} s")
        want = frames if max_seconds is None else min(frames, int(math.ceil(max_seconds * sr)))
        mono = np.empty(want, dtype=np.float32)
        got = 0
        try:
            # Mixed to mono block by block, so memory is one channel's worth whatever the channel count.
            while got < want:
                block = f.read(frames=min(1 << 20, want - got), dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                mono[got : got + block.shape[0]] = block.mean(axis=1) if channels > 1 else block[:, 0]
                got += block.shape[0]
        except (sf.SoundFileError, RuntimeError, ValueError) as e:
            raise MediaError(media_id, "undecodable", f"audio stream is corrupt: {e}") from None
    mono = mono[:got]
    if got == 0:
        raise MediaError(media_id, "empty", "no audio frames could be decoded")
    if got < want and got / sr < limits.min_audio_seconds:
        raise MediaError(media_id, "too_short", f"only {got} frames decode")
    if not np.isfinite(mono).all():
        raise MediaError(media_id, "undecodable", "audio contains NaN or infinite samples")
    return mono, sr


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling of a mono signal x [T] from orig_sr to target_sr -> float32 [ceil(T*target/orig)].

    scipy.signal.resample_poly with the rates reduced to up/down by their gcd: its Kaiser-windowed
    FIR low-pass (cut at the lower Nyquist) removes what the new rate cannot represent, and its delay
    is compensated, so output n lines up with input time n*orig/target.
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"resample expects a mono signal [T], got shape {x.shape}")
    if orig_sr == target_sr or x.size == 0:
        return x.copy()
    # Imported here, not at the top: importing scipy.signal takes about a second.
    from scipy.signal import resample_poly

    g = math.gcd(orig_sr, target_sr)
    return resample_poly(x, target_sr // g, orig_sr // g).astype(np.float32, copy=False)


def decode_audio(
    ref: Ref,
    sample_rate: int,
    media_id: str = "",
    limits: MediaLimits | None = None,
    *,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decodes audio to float32 mono [T] at `sample_rate`, T = ceil(frames * sample_rate / native rate).

    max_seconds: decode and resample only the start (T <= ceil(max_seconds * sample_rate)); for encoders
    that look at a fixed window. The duration limits still apply to the whole file.
    """
    limits = limits or DEFAULT_LIMITS
    mono, sr = _load_audio(ref, media_id, limits, max_seconds)
    out = resample(mono, sr, int(sample_rate)) if sr != sample_rate else mono
    if max_seconds is not None:
        out = out[: int(math.ceil(max_seconds * sample_rate))]
    return out


# ----------------------------------------------------------------------------------------------- probe


def check_audible(x: np.ndarray, media_id: str = "", limits: MediaLimits | None = None) -> None:
    """Raises MediaError("silent") when the peak of x [T] is below `limits.min_audio_peak`."""
    limits = limits or DEFAULT_LIMITS
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak < limits.min_audio_peak:
        level = f"{20 * math.log10(peak):.1f} dBFS" if peak > 0 else "digital zero"
        floor = 20 * math.log10(limits.min_audio_peak)
        raise MediaError(media_id, "silent", f"peak {level} < {floor:.0f} dBFS")


def probe(ref: Ref, modality: str, media_id: str = "", limits: MediaLimits | None = None) -> None:
    """Raises MediaError unless `ref` decodes as `modality` ("image" or "audio") within `limits`;
    audio must also be audible (check_audible)."""
    limits = limits or DEFAULT_LIMITS
    if modality == "image":
        decode_image(ref, media_id, limits)
    elif modality == "audio":
        check_audible(_load_audio(ref, media_id, limits)[0], media_id, limits)
    else:
        raise ValueError(f"probe handles 'image' and 'audio', not {modality!r}")
