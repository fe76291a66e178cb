"""Benchmark of the extraction engine: items/s of `extract` beside a bare loop, and Whisper short clip vs 30 s.

For each encoder, the same inputs (encoded media bytes / sentences of mixed length) go through
  bare:    batches of the same size in input order, `encoder.forward([encoder.prepare(p) ...])`
           (the same decoding, preprocessing and model calls, with no engine around them), and
  extract: fusion.encoders.engine.extract (windows, cost sorting, failure isolation, finiteness check),
measured side by side in one run (best of --repeats, after a warm-up batch). extract/bare > 1 means
the engine is faster (length sorting pads less); < 1 is its overhead. For Whisper it also times the
same 2-5 s clips with short_clip on and off (the 30-s window) and prints the speed-up.

Small randomly initialised models (hidden 128) are built in a temporary folder and always run; with
--real the offline-pack encoders (minilm, effnet-lite0, whisper-tiny by default) run too.

With --real it also prints the engine table, per offline encoder, side by side in one run:
  today:    float32, items decoded in the calling thread between forward passes (the engine before
            reduced precision and decoding threads), and for images also float32 NCHW (no channels_last);
  fp32:     float32 with decoding threads;
  auto:     the default (dtype auto: bf16 on CPUs with AMX / AVX-512 BF16, else fp32) with decoding threads;
  forward:  the bare forward pass of the auto encoder on already prepared batches (no decoding: the
            ceiling the engine can reach);
with auto/today, auto/forward and the minimum cosine of the auto latents to the float32 ones.

Run: python -m benchmarks.bench_extract [--real] [--encoders minilm,whisper-tiny] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from fusion.encoders import EncoderSpec, FrozenEncoder, build_encoder, encoder_status, extract, load_registry
from fusion.encoders.engine import configure_threads

_WORDS = [
    "a",
    "the",
    "of",
    "and",
    "to",
    "in",
    "on",
    "with",
    "cat",
    "dog",
    "bird",
    "car",
    "man",
    "woman",
    "child",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "sits",
    "runs",
    "plays",
    "over",
    "under",
    "near",
    "table",
    "street",
    "park",
    "music",
    "piano",
    "sound",
    "photo",
    "picture",
    "drawing",
    "sky",
    "water",
    "tree",
    "house",
]


# ------------------------------------------------------------------------------------------ models


def build_small_models(root: Path, hidden: int = 128) -> dict[str, EncoderSpec]:
    """Seeded BERT, ViT and Whisper (hidden 128, 2 layers) saved under root; specs for them."""
    import torch
    import transformers
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizer,
        ViTConfig,
        ViTImageProcessorPil,
        ViTModel,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperModel,
    )

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *list("abcdefghijklmnopqrstuvwxyz")]
    text_dir, image_dir, audio_dir = root / "bert", root / "vit", root / "whisper"
    text_dir.mkdir(parents=True, exist_ok=True)
    if int(transformers.__version__.split(".")[0]) >= 5:
        tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=128)
    else:
        (text_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
        tok = BertTokenizer(vocab_file=str(text_dir / "vocab.txt"), model_max_length=128)
    tok.save_pretrained(text_dir)
    layers = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 4 * hidden}
    BertModel(
        BertConfig(vocab_size=len(vocab), hidden_size=hidden, max_position_embeddings=128, **layers)
    ).save_pretrained(text_dir)
    ViTModel(ViTConfig(hidden_size=hidden, image_size=64, patch_size=8, **layers)).save_pretrained(image_dir)
    ViTImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(image_dir)
    WhisperModel(
        WhisperConfig(
            vocab_size=64,
            d_model=hidden,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=4 * hidden,
            decoder_layers=1,
            decoder_attention_heads=4,
            decoder_ffn_dim=4 * hidden,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
    ).save_pretrained(audio_dir)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(audio_dir)
    return {
        "small-text": EncoderSpec("small-text", "text", "hf", str(text_dir), batch_size=32),
        "small-image": EncoderSpec(
            "small-image", "image", "hf", str(image_dir), pooling="cls", batch_size=32
        ),
        "small-audio": EncoderSpec(
            "small-audio", "audio", "hf", str(audio_dir), batch_size=8, options={"short_clip": True}
        ),
    }


# ------------------------------------------------------------------------------------------ inputs


def svg_bytes(rng: np.random.Generator) -> bytes:
    """An emoji-like SVG (a face of circles and a path on a 36x36 view box), rendered at decode time."""
    c = [f"#{int(v):06x}" for v in rng.integers(0, 0xFFFFFF, 4)]
    r = int(rng.integers(10, 17))
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36">'
        f'<circle cx="18" cy="18" r="{r}" fill="{c[0]}"/><circle cx="12" cy="14" r="3" fill="{c[1]}"/>'
        f'<circle cx="24" cy="14" r="3" fill="{c[1]}"/><path d="M10 22 Q18 {28 + r % 5} 26 22" '
        f'stroke="{c[2]}" stroke-width="2" fill="none"/><rect x="4" y="30" width="28" height="3" fill="{c[3]}"/></svg>'
    ).encode()


def make_inputs(modality: str, n: int, seed: int = 0) -> list[tuple[str, object]]:
    """(media_id, payload) items: sentences of 3-60 words; images alternating 96x128 PNG bytes and
    emoji-like SVG bytes (rendered like the emoji sets); or 2-5 s 16-kHz WAV bytes."""
    rng = np.random.default_rng(seed)
    items: list[tuple[str, object]] = []
    for i in range(n):
        if modality == "text":
            payload: object = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 60))))
        elif modality == "image" and i % 2:
            payload = svg_bytes(rng)
        elif modality == "image":
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
            payload = buf.getvalue()
        else:
            import soundfile as sf

            seconds = float(rng.uniform(2.0, 5.0))
            t = np.arange(int(16000 * seconds)) / 16000
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(t.size)
            buf = io.BytesIO()
            sf.write(buf, wave.astype(np.float32), 16000, format="WAV")
            payload = buf.getvalue()
        items.append((f"m{i}", payload))
    return items


# ------------------------------------------------------------------------------------------ timing


def bare_loop(enc: FrozenEncoder, items, batch_size: int) -> int:
    done = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        enc.forward([enc.prepare(p, mid) for mid, p in chunk])
        done += len(chunk)
    return done


def engine(enc: FrozenEncoder, items, batch_size: int) -> int:
    return sum(len(b.media_ids) for b in extract(enc, items, batch_size=batch_size, progress=False))


def best_rates(fns, encs, items, batch_size: int, repeats: int) -> list[float]:
    """Items/s of each (fn, encoder), best of `repeats`; the contenders alternate within each repeat so
    that load from other processes hits both alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, (fn, enc) in enumerate(zip(fns, encs, strict=True)):
            start = time.perf_counter()
            done = fn(enc, items, batch_size)
            best[k] = min(best[k], time.perf_counter() - start)
            if done != len(items):
                raise RuntimeError(f"{enc.spec.name}: encoded {done} of {len(items)} items")
    return [len(items) / t for t in best]


def bench_encoder(enc: FrozenEncoder, items, batch_size: int, repeats: int) -> dict:
    bare_loop(enc, items[:batch_size], batch_size)  # warm-up: lazy inits, allocator
    bare, ext = best_rates([bare_loop, engine], [enc, enc], items, batch_size, repeats)
    return {"encoder": enc.spec.name, "items": len(items), "batch": batch_size, "bare": bare, "extract": ext}


def engine_seq(enc: FrozenEncoder, items, batch_size: int) -> int:
    """The engine with decoding in the calling thread (workers=0)."""
    return sum(
        len(b.media_ids) for b in extract(enc, items, batch_size=batch_size, progress=False, workers=0)
    )


def nchw(enc: FrozenEncoder) -> FrozenEncoder:
    """Turns a float32 TorchImageEncoder into the NCHW path (no channels_last), in place."""
    import torch

    enc.model = enc.model.to(memory_format=torch.contiguous_format)

    def forward(prepared):
        return enc._run(enc._features, torch.from_numpy(np.stack(prepared)).to(enc.device))

    enc.forward = forward
    return enc


def bench_engine(spec: EncoderSpec, items, repeats: int) -> dict:
    """today / fp32 / auto / bare forward items/s of one encoder, alternated within each repeat."""
    bs = spec.batch_size
    fp32 = build_encoder(replace(spec, dtype="float32"))
    auto = build_encoder(replace(spec, dtype="auto"))
    prepared = [(mid, auto.prepare(p, mid)) for mid, p in items]
    if getattr(auto, "sorts_by_cost", auto.modality != "image"):  # the batches the engine forms
        prepared.sort(key=lambda pair: auto.cost(pair[1]))

    def forward_only(enc, _items, batch_size):
        for start in range(0, len(prepared), batch_size):
            enc.forward([p for _, p in prepared[start : start + batch_size]])
        return len(prepared)

    runs = {
        "today": (engine_seq, fp32),
        "fp32": (engine, fp32),
        "auto": (engine, auto),
        "forward": (forward_only, auto),
    }
    if spec.modality == "image" and hasattr(fp32, "model"):
        runs["nchw"] = (engine_seq, nchw(build_encoder(replace(spec, dtype="float32"))))
    for fn, enc in runs.values():  # warm-up: lazy inits, allocator, oneDNN kernels of each precision
        fn(enc, items[:bs], bs)
    rates = dict(zip(runs, best_rates(*zip(*runs.values(), strict=True), items, bs, repeats), strict=True))
    sample = items[: min(len(items), 2 * bs)]
    a, b = engine_vectors(auto, sample, bs), engine_vectors(fp32, sample, bs)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"encoder": spec.name, "batch": bs, "items": len(items), "precision": auto.precision,
            "cos_min": float(cos.min()), **rates}  # fmt: skip


def engine_vectors(enc: FrozenEncoder, items, batch_size: int | None = None) -> np.ndarray:
    """The engine's latents of `items`, in their order; raises if any item could not be encoded."""
    got = {}
    for b in extract(enc, items, batch_size=batch_size, progress=False):
        got.update(zip(b.media_ids, b.vectors, strict=True))
        if b.failures:
            raise RuntimeError(f"{enc.spec.name}: could not encode {[f.media_id for f in b.failures]}")
    return np.stack([got[mid] for mid, _ in items])


def print_engine_table(rows: list[dict]) -> None:
    print()
    print("engine: items/s side by side (today = float32, decoding in line; auto = the default)")
    head = f"{'encoder':<14}{'batch':>6}{'auto is':>10}{'nchw':>8}{'today':>8}{'fp32':>8}{'auto':>8}{'forward':>9}"
    print(head + f"{'auto/today':>12}{'auto/forward':>14}{'cos min':>9}")
    for r in rows:
        nchw_rate = f"{r['nchw']:>8.1f}" if "nchw" in r else f"{'-':>8}"
        print(
            f"{r['encoder']:<14}{r['batch']:>6}{r['precision']:>10}{nchw_rate}{r['today']:>8.1f}{r['fp32']:>8.1f}"
            f"{r['auto']:>8.1f}{r['forward']:>9.1f}{r['auto'] / r['today']:>12.2f}{r['auto'] / r['forward']:>14.2f}"
            f"{r['cos_min']:>9.4f}"
        )


def bench_whisper_window(spec: EncoderSpec, items, repeats: int) -> dict:
    short = build_encoder(replace(spec, options={**spec.options, "short_clip": True}))
    full = build_encoder(replace(spec, options={**spec.options, "short_clip": False}))
    bs = spec.batch_size
    bare_loop(short, items[:bs], bs)
    bare_loop(full, items[:bs], bs)
    r_short, r_full = best_rates([engine, engine], [short, full], items, bs, repeats)
    return {"encoder": spec.name, "clips": len(items), "short": r_short, "full": r_full}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="also run the offline-pack encoders")
    parser.add_argument(
        "--encoders",
        default="effnet-lite0,effnet-lite2,minilm,mpnet,whisper-tiny,whisper-tiny-30s,whisper-base",
        help="offline encoders for --real",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-text", type=int, default=384)
    parser.add_argument("--n-image", type=int, default=128)
    parser.add_argument("--n-audio", type=int, default=24)
    args = parser.parse_args(argv)
    sizes = {"text": args.n_text, "image": args.n_image, "audio": args.n_audio}
    print(f"torch threads: {configure_threads('cpu')}")

    rows, whisper_rows, engine_rows = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        specs = build_small_models(Path(tmp))
        if args.real:
            registry = load_registry()
            for name in [n.strip() for n in args.encoders.split(",") if n.strip()]:
                ok, why = encoder_status(registry[name])
                if ok:
                    specs[name] = registry[name]
                else:
                    print(f"skipping {name}: {why}")
        for name, spec in specs.items():
            real = not name.startswith("small-")
            n = sizes[spec.modality] // (2 if real else 1)
            items = make_inputs(spec.modality, n)
            enc = build_encoder(spec)
            rows.append(bench_encoder(enc, items, spec.batch_size, args.repeats))
            if real:
                engine_rows.append(bench_engine(spec, items, args.repeats))
            if spec.modality == "audio" and getattr(enc, "short_clip", False):  # short clip vs 30-s window
                whisper_rows.append(
                    bench_whisper_window(spec, items[: max(spec.batch_size, n // 2)], args.repeats)
                )

    print()
    print(f"{'encoder':<16}{'items':>7}{'batch':>7}{'bare it/s':>12}{'extract it/s':>14}{'extract/bare':>14}")
    for r in rows:
        print(
            f"{r['encoder']:<16}{r['items']:>7}{r['batch']:>7}{r['bare']:>12.1f}{r['extract']:>14.1f}"
            f"{r['extract'] / r['bare']:>14.2f}"
        )
    if engine_rows:
        print_engine_table(engine_rows)
    if whisper_rows:
        print()
        print(f"{'whisper (2-5 s)':<16}{'clips':>7}{'short it/s':>12}{'30-s it/s':>12}{'speed-up':>10}")
        for r in whisper_rows:
            print(
                f"{r['encoder']:<16}{r['clips']:>7}{r['short']:>12.1f}{r['full']:>12.1f}{r['short'] / r['full']:>10.1f}x"
            )


if __name__ == "__main__":
    main()
