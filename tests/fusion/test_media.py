"""Tests for fusion.media: image and audio decoding, limits, typed errors and the resampler."""

from __future__ import annotations

import base64
import gzip
import io
import os
import pickle

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from fusion.media import (
    DEFAULT_LIMITS,
    MediaError,
    MediaLimits,
    check_audible,
    decode_audio,
    decode_image,
    is_url,
    probe,
    read_bytes,
    resample,
    resolve_under,
    sniff_modality,
)
from tests.fixtures.media_factory import audio_bytes, image_bytes, png_header_only, sine

SVG_TALL = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 10 40">'
    b'<rect x="0" y="0" width="5" height="40" fill="#0000ff"/></svg>'
)


def dominant_hz(x: np.ndarray, sr: int) -> float:
    """Frequency (Hz) of the largest peak of x [T]'s Hann-windowed spectrum, refined by a parabola."""
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1 : k + 2] + 1e-12)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / x.size


def reason_of(fn, *args, **kwargs) -> str:
    with pytest.raises(MediaError) as info:
        fn(*args, **kwargs)
    return info.value.reason


# ------------------------------------------------------------------------------------------------ errors


def test_media_error_is_typed_readable_and_picklable():
    e = MediaError("img-7", "too_large", "99 bytes > limit 10")
    assert (e.media_id, e.reason, e.detail) == ("img-7", "too_large", "99 bytes > limit 10")
    text = str(e)
    assert "img-7" in text and "too_large" in text and "99 bytes" in text
    back = pickle.loads(pickle.dumps(e))
    assert (back.media_id, back.reason, back.detail) == (e.media_id, e.reason, e.detail)
    with pytest.raises(ValueError, match="unknown MediaError reason"):
        MediaError("x", "oops")


# ------------------------------------------------------------------------------------------------ bytes


def test_read_bytes_reasons(tmp_path):
    assert reason_of(read_bytes, tmp_path / "nope.png", "a") == "missing"
    (tmp_path / "empty.png").write_bytes(b"")
    assert reason_of(read_bytes, tmp_path / "empty.png") == "empty"
    assert reason_of(read_bytes, b"") == "empty"
    (tmp_path / "big.bin").write_bytes(b"x" * 100)
    assert reason_of(read_bytes, tmp_path / "big.bin", limits=MediaLimits(max_bytes=50)) == "too_large"
    assert reason_of(read_bytes, b"x" * 100, limits=MediaLimits(max_bytes=50)) == "too_large"
    assert reason_of(read_bytes, tmp_path) == "unreadable"  # a folder
    assert reason_of(read_bytes, "https://example.com/a.png") == "url"
    assert read_bytes(tmp_path / "big.bin") == b"x" * 100
    with pytest.raises(TypeError):
        read_bytes(123)  # type: ignore[arg-type]


def test_resolve_under_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"s")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(root / "sub" / "a.png", root / "inside_link.png")
    assert resolve_under(root, "sub/a.png") == (root / "sub" / "a.png").resolve()
    assert resolve_under(root, "sub/../sub/a.png") == (root / "sub" / "a.png").resolve()
    assert resolve_under(root, "inside_link.png") == (root / "sub" / "a.png").resolve()
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "sub/../../secret.png"):
        assert reason_of(resolve_under, root, bad) == "outside_root", bad
    assert reason_of(read_bytes, "../secret.png", root=root) == "outside_root"
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(root / "loop_a", root / "loop_b")
    assert reason_of(read_bytes, "loop_a", root=root) == "unreadable"
    assert reason_of(read_bytes, "nul\0byte.png", root=root) == "unreadable"
    assert read_bytes("sub/a.png", root=root) == b"x"


def test_sniff_modality():
    assert sniff_modality(image_bytes(fmt="PNG")) == "image"
    assert sniff_modality(image_bytes(fmt="JPEG")) == "image"
    assert sniff_modality(image_bytes(fmt="WEBP")) == "image"
    assert sniff_modality(image_bytes(fmt="GIF")) == "image"
    assert sniff_modality(SVG_TALL) == "image"
    assert sniff_modality(gzip.compress(SVG_TALL)) == "image"
    for fmt in ("WAV", "FLAC", "OGG", "MP3"):
        assert sniff_modality(audio_bytes(fmt=fmt)) == "audio", fmt
    assert sniff_modality(b"hello, world") is None
    assert sniff_modality(b"BMW cars are fast, says the caption") is None
    assert sniff_modality(b"") is None


# ------------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_decode_image_formats(fmt, tmp_path):
    data = image_bytes((200, 30, 30), (16, 12), fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    for ref in (data, path, str(path)):
        im = decode_image(ref, "x")
        assert im.mode == "RGB" and im.size == (16, 12)
        r, g, b = im.getpixel((8, 6))
        assert abs(r - 200) <= 8 and abs(g - 30) <= 8 and abs(b - 30) <= 8


def test_gif_first_frame():
    frames = [Image.new("P", (8, 8), 0), Image.new("P", (8, 8), 1)]
    palette = [255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6)
    for f in frames:
        f.putpalette(palette)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    im = decode_image(buf.getvalue())
    assert im.getpixel((3, 3)) == (255, 0, 0)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 255, 128))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    im = decode_image(buf.getvalue())
    assert im.mode == "RGB"
    assert im.getpixel((0, 0)) == (255, 255, 255)
    assert im.getpixel((1, 1)) == (255, 0, 0)
    r, g, b = im.getpixel((2, 2))
    assert b == 255 and 120 <= r <= 135 and 120 <= g <= 135
    # A palette image with a transparent index is composited too.
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 255, 0, 10, 10, 10] + [0] * 762)
    p.putpixel((0, 0), 1)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=1)
    im = decode_image(buf.getvalue())
    assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((3, 3)) == (0, 255, 0)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(buf.getvalue())) as raw:
        assert raw.size == (40, 20)
    assert decode_image(buf.getvalue()).size == (20, 40)


def test_wide_integer_modes_scale_instead_of_clip():
    arr = np.array([[0, 1000], [30000, 60000]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    im = decode_image(buf.getvalue())
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((1, 1)) == (255, 255, 255)
    assert 100 < im.getpixel((0, 1))[0] < 140  # 30000/60000 of the range, not clipped to 255


def test_svg_renders_long_side_on_white(tmp_path):
    im = decode_image(SVG_TALL, "icon")
    assert im.mode == "RGB" and im.size == (64, DEFAULT_LIMITS.svg_size)
    assert im.getpixel((5, 100)) == (0, 0, 255)  # the rect covers the left half
    assert im.getpixel((60, 100)) == (255, 255, 255)  # the rest is transparent -> white
    wide = b'<svg xmlns="http://www.w3.org/2000/svg" width="300" height="100"><circle cx="50" cy="50" r="40"/></svg>'
    assert decode_image(wide).size == (256, 85) or decode_image(wide).size == (256, 86)
    (tmp_path / "a.svgz").write_bytes(gzip.compress(SVG_TALL))
    assert decode_image(tmp_path / "a.svgz").size == (64, 256)
    assert decode_image(SVG_TALL, limits=MediaLimits(svg_size=32)).size == (8, 32)


def _svg_with_image(href: str) -> bytes:
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="10" height="10">'
        f'<image width="10" height="10" xlink:href="{href}"/></svg>'
    ).encode()


def test_svg_never_reads_files_it_names(tmp_path):
    red = tmp_path / "red.png"
    red.write_bytes(image_bytes((255, 0, 0), (10, 10)))
    # resvg alone would paint the local file (and hang on /dev/zero); the reference is dropped instead.
    for href in (str(red), f"file://{red}", "/dev/zero", "red.png"):
        assert decode_image(_svg_with_image(href)).getpixel((128, 128)) == (255, 255, 255), href
    inline = "data:image/png;base64," + base64.b64encode(red.read_bytes()).decode()
    assert decode_image(_svg_with_image(inline)).getpixel((128, 128)) == (255, 0, 0)
    bomb = "data:image/png;base64," + base64.b64encode(png_header_only(50_000, 50_000)).decode()
    assert reason_of(decode_image, _svg_with_image(bomb), "svg-bomb") == "decompression_bomb"


def test_bad_svg_is_undecodable():
    assert reason_of(decode_image, b"<svg><html></html>", "s") == "undecodable"
    assert reason_of(decode_image, b'<html xmlns="x"><svg/></html>', "s") == "undecodable"
    assert reason_of(decode_image, b"<svg xmlns='http://www.w3.org/2000/svg'><rect", "s") == "undecodable"


def test_decompression_bombs_are_refused():
    # Declared 100000 x 100000: Pillow's own guard fires on open.
    assert reason_of(decode_image, png_header_only(100_000, 100_000), "bomb") == "decompression_bomb"
    # Declared 10000 x 5000 = 50 M pixels: under Pillow's error threshold, over our limit.
    assert reason_of(decode_image, png_header_only(10_000, 5_000), "bomb") == "decompression_bomb"
    assert reason_of(decode_image, image_bytes(size=(20, 20)), limits=MediaLimits(max_pixels=100)) == (
        "decompression_bomb"
    )
    with pytest.raises(MediaError) as info:
        decode_image(gzip.compress(b"<svg " + b" " * 5000 + b"/>"), limits=MediaLimits(max_bytes=2000))
    assert info.value.reason in ("decompression_bomb", "too_large")


def test_broken_images():
    data = image_bytes(size=(64, 64), fmt="JPEG")
    assert reason_of(decode_image, data[: len(data) // 2], "t") == "undecodable"
    assert reason_of(decode_image, b"definitely not an image", "g") == "undecodable"
    assert reason_of(decode_image, audio_bytes(), "wav") == "unsupported_format"
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, "ICO")
    assert reason_of(decode_image, ico.getvalue()) == "unsupported_format"


# ------------------------------------------------------------------------------------------------ audio


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_decode_audio_formats(fmt, tmp_path):
    data = audio_bytes(freq=440.0, sr=16000, seconds=1.0, fmt=fmt)
    path = tmp_path / f"a.{fmt.lower()}"
    path.write_bytes(data)
    x = decode_audio(path, 16000, "a")
    assert x.dtype == np.float32 and x.ndim == 1
    # Lossy codecs pad a little (MP3 encoder delay): allow 0.1 s of slack.
    assert abs(x.size - 16000) <= 1600
    assert abs(dominant_hz(x, 16000) - 440.0) < 2.0


def test_stereo_is_mixed_to_mono():
    left = sine(300.0, 8000, 0.5, amp=0.8)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    buf = io.BytesIO()
    sf.write(buf, stereo, 8000, format="WAV", subtype="FLOAT")
    x = decode_audio(buf.getvalue(), 8000)
    assert x.shape == (4000,)
    np.testing.assert_allclose(x, left / 2, atol=1e-6)


@pytest.mark.parametrize(
    ("orig", "target", "freq"),
    [
        (44100, 16000, 1000.0),
        (48000, 16000, 3000.0),
        (8000, 16000, 440.0),
        (22050, 16000, 7000.0),
        (16000, 16001, 1234.0),
    ],
)
def test_resample_keeps_frequency_and_level(orig, target, freq):
    x = sine(freq, orig, 1.0, amp=0.5)
    y = resample(x, orig, target)
    assert y.dtype == np.float32 and y.size == -(-x.size * target // orig)
    assert abs(dominant_hz(y, target) - freq) < 0.5
    mid = y[target // 10 : -target // 10]  # away from the zero-padded edges
    expected_rms = 0.5 / np.sqrt(2)
    gain = 0.8 if freq > 0.85 * min(orig, target) / 2 else 0.98  # near the cut-off the passband rolls off
    assert gain * expected_rms < np.sqrt(np.mean(mid**2)) < 1.02 * expected_rms


def test_resample_removes_what_cannot_be_represented():
    # 10 kHz is above the 8 kHz Nyquist of 16 kHz: a naive decimator would alias it to 6 kHz.
    y = resample(sine(10_000.0, 44100, 1.0, amp=0.5), 44100, 16000)
    assert np.sqrt(np.mean(y[1600:-1600] ** 2)) < 1e-3


@pytest.mark.parametrize(("orig", "target"), [(44100, 16000), (48000, 16000), (8000, 12000), (22050, 16000)])
def test_resample_lines_up_with_the_signal_sampled_at_the_new_rate(orig, target):
    # Two tones well inside both passbands: the output must be the same tones sampled at the new rate,
    # in phase (the filter delay is compensated) and at the same level.
    t_in = np.arange(orig // 2) / orig
    x = (0.4 * np.sin(2 * np.pi * 440.0 * t_in) + 0.2 * np.sin(2 * np.pi * 2500.0 * t_in + 1.0)).astype(
        np.float32
    )
    y = resample(x, orig, target)
    t_out = np.arange(y.size) / target
    want = 0.4 * np.sin(2 * np.pi * 440.0 * t_out) + 0.2 * np.sin(2 * np.pi * 2500.0 * t_out + 1.0)
    mid = slice(target // 20, -target // 20)  # away from the zero-padded edges
    np.testing.assert_allclose(y[mid], want[mid], atol=5e-3)


def test_resample_takes_any_numeric_mono_input():
    ints = (sine(300.0, 8000, 0.25, amp=0.5) * 32767).astype(np.int16)
    y = resample(ints, 8000, 16000)
    assert y.dtype == np.float32 and y.shape == (4000,)
    assert abs(dominant_hz(y, 16000) - 300.0) < 0.5
    assert resample(np.zeros(0, np.float32), 44100, 16000).shape == (0,)


def test_resample_identity_and_errors():
    x = sine(100.0, 1000, 0.1)
    same = resample(x, 1000, 1000)
    np.testing.assert_array_equal(same, x)
    assert same is not x  # a copy: the caller may write into it
    with pytest.raises(ValueError):
        resample(x, 0, 16000)
    with pytest.raises(ValueError):
        resample(x, 16000, -1)
    with pytest.raises(ValueError):
        resample(np.zeros((2, 10), np.float32), 1000, 2000)


def test_decode_audio_resamples():
    data = audio_bytes(freq=1000.0, sr=44100, seconds=1.0, fmt="FLAC")
    x = decode_audio(data, 16000)
    assert x.size == 16000
    assert abs(dominant_hz(x, 16000) - 1000.0) < 0.5


def test_decode_audio_max_seconds_reads_only_the_start():
    data = audio_bytes(freq=500.0, sr=44100, seconds=3.0, fmt="FLAC")
    full = decode_audio(data, 16000)
    head = decode_audio(data, 16000, max_seconds=1.0)
    assert full.size == 48000 and head.size == 16000
    # Away from the cut (where the full decode sees the samples that follow), both agree.
    np.testing.assert_allclose(head[:15000], full[:15000], atol=1e-4)
    assert reason_of(
        decode_audio, data, 16000, limits=MediaLimits(max_audio_seconds=2.0), max_seconds=1.0
    ) == ("too_long")


def test_audio_decompression_limits():
    buf = io.BytesIO()
    # 40 channels: as a compressed file of silence this is tiny, decoded it is 40x one channel.
    sf.write(buf, np.zeros((1600, 40), np.float32), 16000, format="WAV")
    assert reason_of(decode_audio, buf.getvalue(), 16000, "many") == "unsupported_format"
    many = np.stack([sine(200.0, 8000, 0.5)] * 6, axis=1)
    buf = io.BytesIO()
    sf.write(buf, many, 8000, format="WAV", subtype="FLOAT")
    np.testing.assert_allclose(decode_audio(buf.getvalue(), 8000), many[:, 0], atol=1e-6)


def test_audio_duration_limits():
    assert reason_of(
        decode_audio, audio_bytes(seconds=2.0), 16000, limits=MediaLimits(max_audio_seconds=1.0)
    ) == ("too_long")
    assert reason_of(decode_audio, audio_bytes(seconds=0.01), 16000, "short") == "too_short"
    buf = io.BytesIO()
    sf.write(buf, np.zeros((0,), np.float32), 16000, format="WAV")
    assert reason_of(decode_audio, buf.getvalue(), 16000) == "empty"


def test_broken_audio():
    data = audio_bytes(seconds=1.0, fmt="FLAC")
    assert reason_of(decode_audio, data[:60], 16000) == "undecodable"
    assert reason_of(decode_audio, b"RIFF\x00\x00\x00\x00WAVEjunkjunk", 16000) == "undecodable"
    assert reason_of(decode_audio, image_bytes(), 16000) == "unsupported_format"


def test_probe(tmp_path):
    probe(image_bytes(), "image")
    probe(audio_bytes(), "audio")
    assert reason_of(probe, image_bytes(), "audio", "x") == "unsupported_format"
    assert reason_of(probe, tmp_path / "gone.wav", "audio", "x") == "missing"
    with pytest.raises(ValueError):
        probe(b"hello", "text")


@pytest.mark.parametrize("unit, per_px", [("pt", 4 / 3), ("mm", 96 / 25.4), ("in", 96.0)])
def test_svg_sizes_in_absolute_units_render(unit, per_px):
    # resvg alone refuses width="100pt" ("invalid size"); a third of openclipart is drawn so.
    w, h = 120 / per_px, 60 / per_px  # 120 x 60 px whatever the unit
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}{unit}" height="{h}{unit}">'
        '<rect x="0" y="0" width="60" height="60" fill="#ff0000"/></svg>'
    ).encode()
    im = decode_image(svg)
    assert im.size == (256, 128)
    assert im.getpixel((20, 64)) == (255, 0, 0)  # the left half is the red square
    assert im.getpixel((230, 64)) == (255, 255, 255)  # the right half stays white


# ------------------------------------------------------------------------------------------------ bad input


URLS = [
    "http://example.com/cat.png",
    "https://example.com/cat.png?size=large",
    "HTTPS://EXAMPLE.COM/CAT.PNG",
    "s3://bucket/images/cat.png",
    "gs://bucket/cat.png",
    "file:///etc/passwd",
    "ftp://ftp.example.com/cat.png",
    "hf://datasets/someone/pets/cat.png",
    "  https://example.com/leading-space.png",
    "data:image/png;base64,iVBORw0KGgo=",
    "data:,plain",
]


@pytest.mark.parametrize("url", URLS)
def test_a_url_is_refused_as_url_not_missing(url, tmp_path):
    assert is_url(url)
    assert reason_of(resolve_under, tmp_path, url) == "url"
    assert reason_of(read_bytes, url) == "url"
    assert reason_of(read_bytes, url, root=tmp_path) == "url"
    assert reason_of(probe, url, "image") == "url"


def test_paths_that_only_look_like_urls_are_paths(tmp_path):
    for path in ("cat.png", "data/cat.png", "data:cat.png", "http/cat.png", "C:/img/cat.png", "x://a"):
        assert not is_url(path), path
    assert not is_url(b"https://example.com")  # bytes are a payload, never a reference
    (tmp_path / "http:").mkdir()
    (tmp_path / "http:" / "x.png").write_bytes(image_bytes())
    assert read_bytes("http:/x.png", root=tmp_path) == image_bytes()  # one slash: a folder named "http:"


def _wav(x: np.ndarray, sr: int = 16000, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_probe_refuses_silent_audio():
    zeros = np.zeros(8000, np.float32)
    assert reason_of(probe, _wav(zeros), "audio", "s") == "silent"
    assert reason_of(probe, _wav(zeros, fmt="FLAC"), "audio") == "silent"
    assert reason_of(probe, _wav(np.zeros((8000, 2), np.float32)), "audio") == "silent"  # stereo
    # One least-significant bit of 16-bit dither (-90 dBFS) and a -80 dBFS tone: still silence.
    lsb = np.where(np.arange(8000) % 2 == 0, 1, -1).astype(np.float32) / 32768
    assert reason_of(probe, _wav(lsb), "audio") == "silent"
    assert reason_of(probe, audio_bytes(amp=10 ** (-80 / 20)), "audio") == "silent"
    with pytest.raises(MediaError, match="digital zero"):
        probe(_wav(zeros), "audio")
    # A quiet but audible tone passes, and the check can be turned off.
    probe(audio_bytes(amp=10 ** (-60 / 20)), "audio")
    probe(_wav(zeros), "audio", limits=MediaLimits(min_audio_peak=0.0))
    # Decoding is not judging: the encoders still get silence if ingest let it through.
    assert decode_audio(_wav(zeros), 16000).shape == (8000,)
    check_audible(sine(440.0, 16000, 0.1))
    assert reason_of(check_audible, np.zeros(0, np.float32)) == "silent"


def test_limits_carry_the_caption_length():
    assert DEFAULT_LIMITS.max_caption_chars == 2000
    assert MediaLimits(max_caption_chars=10).max_caption_chars == 10
