"""Benchmark of the audio-text ingest: FluidSynth rendering speed of the `notes` source, and corpus sizes.

Measures, side by side in one run, rendering N notes the naive way (one MIDI file and one
fluidsynth process per note, loading the 140 MB soundfont each time) against the batched way
`notes` uses (one MIDI file with one slot per note, one process per 64 notes), and prints
notes/s for each and the ratio. Then builds `notes` in a fresh cache at the demo limit and at
full size and prints the counts and wall times. With --whisper it also times the whisper-tiny
encoder (short-clip path, offline pack) on the demo notes, to size the demo.

Run: python -m benchmarks.bench_ingest_audio [--notes 48] [--demo-limit 17] [--whisper]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from pipelines.sources.notes import (
    SAMPLE_RATE,
    fetch_notes,
    find_soundfont,
    note_grid,
    render_notes,
    write_smf,
)


def _render_one_per_process(notes, sf2: Path, out: Path) -> None:
    """The naive renderer the batched one replaces: a MIDI file and a fluidsynth process per note."""
    for n in notes:
        mid, wav = out / f"{n.key}.mid", out / f"{n.key}.wav"
        mid.write_bytes(write_smf([n]))
        cmd = ["fluidsynth", "-ni", "-q", "-R", "0", "-C", "0", "-r", str(SAMPLE_RATE), "-F", str(wav)]
        subprocess.run([*cmd, str(sf2), str(mid)], check=True, capture_output=True)


def _whisper_seconds_per_clip(ds, n: int) -> float:
    from fusion.encoders.registry import build_encoder, load_registry  # heavy: only with --whisper

    encoder = build_encoder(load_registry()["whisper-tiny"])
    paths = [m.path for m in ds.media.values() if m.modality == "audio"][:n]
    prepared = [encoder.prepare(p) for p in paths[:4]]
    encoder.forward(prepared)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(paths), 16):
        encoder.forward([encoder.prepare(p) for p in paths[i : i + 16]])
    return (time.perf_counter() - t0) / len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--notes", type=int, default=48, help="notes rendered by each method")
    ap.add_argument("--demo-limit", type=int, default=17, help="concepts kept by the demo")
    ap.add_argument("--whisper", action="store_true", help="also time whisper-tiny on the demo notes")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-notes-") as tmp:
        tmp = Path(tmp)
        sf2 = find_soundfont(tmp)
        grid = note_grid(programs=range(0, 128, 8), pitches=(48, 60, 72), velocities=(80,), drums=False)
        notes = grid[: args.notes]
        (tmp / "naive").mkdir()
        t0 = time.perf_counter()
        _render_one_per_process(notes, sf2, tmp / "naive")
        naive = time.perf_counter() - t0
        t0 = time.perf_counter()
        render_notes(notes, tmp / "batched", sf2, progress=False)
        batched = time.perf_counter() - t0
        print(f"render {len(notes)} notes: one process per note {len(notes) / naive:7.1f} notes/s")
        print(f"render {len(notes)} notes: batched (64/process) {len(notes) / batched:7.1f} notes/s")
        print(f"ratio batched/per-note speed: {naive / batched:.1f}x")

        for label, limit in (("demo", args.demo_limit), ("full", None)):
            cache = tmp / f"cache-{label}"
            t0 = time.perf_counter()
            ds = fetch_notes(cache, limit=limit, progress=False)
            dt = time.perf_counter() - t0
            notes_n = ds.summary()["unique_media"] + len(ds.quarantine)
            print(
                f"notes {label} (limit={limit}): {ds.summary()} quarantine={ds.quarantine_counts()} "
                f"render+index {dt:.1f} s ({notes_n / dt:.0f} notes/s)"
            )
            if label == "demo" and args.whisper:
                per_clip = _whisper_seconds_per_clip(ds, 64)
                n_media = ds.summary()["unique_media"]
                print(
                    f"whisper-tiny short-clip encode: {per_clip * 1000:.0f} ms/clip -> "
                    f"{per_clip * n_media:.0f} s for the {n_media} demo clips"
                )


if __name__ == "__main__":
    main()
