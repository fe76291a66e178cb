"""Tests of the audio-text sources: `notes` (FluidSynth renders of GM notes) and `sounds` (Debian sound packages).

Fast tests render a handful of real notes with the installed fluidsynth (a declared system
dependency: they fail, not skip, without it) and build `sounds` from a package-shaped folder.
The slow test downloads real Debian packages with apt-get.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile

from pipelines.sources import SOURCES
from pipelines.sources.common import SourceUnavailable
from pipelines.sources.notes import (
    GM_DRUMS,
    GM_PROGRAMS,
    SAMPLE_RATE,
    SLOT_SECONDS,
    Note,
    fetch_notes,
    find_soundfont,
    instrument_name,
    note_captions,
    note_grid,
    note_name,
    pick_concepts,
    render_batch,
    write_smf,
)
from pipelines.sources.sounds import (
    SoundPackage,
    clean_name,
    fetch_sounds,
    read_copyright,
    sound_caption,
    split_words,
)

# ---------------------------------------------------------------------------------------------
# A minimal SMF reader, written from the spec independently of the writer (mido)


def _read_vlq(buf: bytes, i: int) -> tuple[int, int]:
    value = 0
    while True:
        b = buf[i]
        i += 1
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            return value, i


def _parse_smf(data: bytes) -> tuple[tuple[int, int, int], list[tuple[int, bytes]]]:
    """((format, ntracks, division), [(absolute tick, event bytes)]) of a one-track SMF."""
    assert data[:4] == b"MThd"
    hlen, fmt, ntracks, division = struct.unpack(">IHHH", data[4:14])
    assert hlen == 6
    assert data[14:18] == b"MTrk"
    (tlen,) = struct.unpack(">I", data[18:22])
    track = data[22 : 22 + tlen]
    assert len(data) == 22 + tlen, "bytes after the declared track length"
    events: list[tuple[int, bytes]] = []
    i, now, running = 0, 0, None
    while i < len(track):
        delta, i = _read_vlq(track, i)
        now += delta
        status = track[i]
        if status == 0xFF:
            length, j = _read_vlq(track, i + 2)
            events.append((now, track[i : j + length]))
            i = j + length
            running = None
        else:
            if status & 0x80:  # a status byte; otherwise running status: the previous one applies
                running = status
                i += 1
            assert running is not None, "data byte without a status"
            size = 1 if running & 0xF0 in (0xC0, 0xD0) else 2
            events.append((now, bytes([running]) + track[i : i + size]))
            i += size
    return (fmt, ntracks, division), events


def test_smf_parses_back_to_the_notes_written():
    notes = [Note(42, 48, 40), Note(0, 72, 120), Note(0, 38, 100, drum=True)]
    (fmt, ntracks, division), events = _parse_smf(write_smf(notes, hold_s=1.5, slot_s=2.0))
    assert (fmt, ntracks, division) == (0, 1, 480)
    assert events[0] == (0, b"\xff\x51\x03\x07\xa1\x20")  # 500,000 us per quarter: 960 ticks/s
    assert events[-1] == (3 * 1920, b"\xff\x2f\x00")
    ticks = [t for t, _ in events]
    assert ticks == sorted(ticks)
    on = [(t, e) for t, e in events if e[0] & 0xF0 == 0x90]
    off = [(t, e) for t, e in events if e[0] & 0xF0 == 0x80]
    progs = [(t, e) for t, e in events if e[0] & 0xF0 == 0xC0]
    cuts = [(t, e) for t, e in events if e[0] & 0xF0 == 0xB0]
    assert on == [(0, b"\x90\x30\x28"), (1920, b"\x90\x48\x78"), (3840, b"\x99\x26\x64")]
    assert off == [(1440, b"\x80\x30\x00"), (3360, b"\x80\x48\x00"), (5280, b"\x89\x26\x00")]
    assert progs == [(0, b"\xc0\x2a"), (1920, b"\xc0\x00")]  # no program change for the drum
    assert [e[1:] for _, e in cuts] == [b"\x78\x00"] * 3  # controller 120: all sound off
    assert all(start < t < start + 1920 for (t, _), start in zip(cuts, (0, 1920, 3840), strict=True))


def test_smf_rejects_bad_input():
    with pytest.raises(ValueError):
        write_smf([])
    with pytest.raises(ValueError):
        write_smf([Note(0, 60, 80)], hold_s=2.0, slot_s=2.0)
    with pytest.raises(ValueError):
        Note(128, 60, 80)
    with pytest.raises(ValueError):
        Note(0, 20, 80, drum=True)  # key 20 is not in the GM drum map


# ---------------------------------------------------------------------------------------------
# Captions


def test_gm_tables_are_complete():
    assert len(GM_PROGRAMS) == 128 and len(set(GM_PROGRAMS)) == 128
    assert sorted(GM_DRUMS) == list(range(35, 82))
    names = [instrument_name(p) for p in range(128)]
    assert len(set(names)) == 128, "two programs would share a concept"
    with pytest.raises(ValueError):
        instrument_name(128)


def test_caption_names_read_well_where_the_gm_tables_do_not():
    # pretty_midi's spellings ("Synth Choir", "Crash Cymbal 2", "Mute Hi Conga", "D#4") are reworded for
    # captions; these are the names the captions have always used.
    assert instrument_name(54) == "synth voice" and instrument_name(83) == "chiff synth lead"
    assert instrument_name(0) == "acoustic grand piano" and instrument_name(76) == "blown bottle"
    assert (
        GM_DRUMS[36] == "bass drum" and GM_DRUMS[42] == "closed hi-hat" and GM_DRUMS[52] == "Chinese cymbal"
    )
    assert GM_DRUMS[57] == "second crash cymbal" and GM_DRUMS[62] == "muted high conga"
    assert GM_DRUMS[35] == "acoustic bass drum" and GM_DRUMS[81] == "open triangle"
    assert [note_name(k) for k in (0, 60, 61, 63, 66, 68, 70, 71, 127)] == [
        "C-1", "C4", "C sharp4", "E flat4", "F sharp4", "A flat4", "B flat4", "B4", "G9",
    ]  # fmt: skip


def test_caption_builder_cello():
    assert instrument_name(42) == "cello"
    caps = note_captions(Note(42, 48, 40))
    assert caps[0] == "a cello playing a low note softly"
    assert len(caps) == len(set(caps)) == 3
    assert all("cello" in c for c in caps)
    loud_high = note_captions(Note(42, 84, 120))
    assert loud_high[0] == "a cello playing a very high note loudly"
    assert "C6" in loud_high[1]


def test_caption_builder_articles_effects_and_drums():
    assert note_captions(Note(56, 60, 80))[0] == "a trumpet playing a middle note at medium volume"
    assert note_captions(Note(68, 60, 80))[0].startswith("an oboe playing")
    assert note_captions(Note(125, 60, 120))[0] == "the sound of a helicopter, middle pitched and loud"
    drum = note_captions(Note(0, 38, 40, drum=True))
    assert drum[0] == "an acoustic snare hit softly"
    assert Note(0, 38, 40, drum=True).concept == "drum: acoustic snare"


# ---------------------------------------------------------------------------------------------
# File-name cleaner

CLEANER_CASES = [
    ("bass_hit_c", "", "a bass hit in C"),
    ("ambi_glass_hum", "", "an ambient glass hum"),
    ("bd_808", "", "a bass drum 808"),
    ("elec_filt_snare", "", "an electronic filtered snare"),
    ("perc_bell2", "", "a percussion bell"),
    ("misc_burp", "", "a burp"),
    ("kick_hard01", "drums", "a hard kick drum"),
    ("hihat_closed02", "drums", "a closed hi-hat drum sound"),
    ("snare01", "drums", "a snare drum sound"),
    ("909beat01", "beats", "a 909 beat"),
    ("tb303_01", "bassloops", "a TB-303 bass loop"),
    ("e_organ01", "instruments", "an electric organ"),
    ("steel_guitar_heavy_distorted01", "instruments", "a heavy distorted steel guitar"),
    ("explode01", "effects", "an explode sound effect"),
    ("HiHatOpen02", "", "an open hi-hat"),
    ("human-die-1", "", "a human death cry"),
    ("lfo_trancegate_quarter", "waveforms", "an LFO trancegate quarter waveform"),
    ("dialog-warning", "", "a dialog warning"),
    ("birds1", "ambient", "a birds ambience"),
    ("loop_amen", "", "an amen loop"),
    ("loop_3d_printer", "", "a 3d printer loop"),
    ("drum_tom_lo_soft", "", "a low soft tom drum"),
    ("drum_cymbal_open", "", "an open cymbal"),
    ("drum_roll", "", "a drum roll"),
    ("drum_heavy_kick", "", "a heavy kick drum"),
    ("human-old-hit-4", "", "an old human hit"),
    ("glitch_bass_g", "", "a glitch bass in G"),
]


@pytest.mark.parametrize(("stem", "folder", "expected"), CLEANER_CASES)
def test_filename_cleaner(stem, folder, expected):
    assert sound_caption(stem, folder) == expected


def test_filename_cleaner_edge_cases():
    assert split_words("HiHatOpen02") == ["hihat", "open"]
    assert split_words("matrix1000_pluck01") == ["matrix1000", "pluck"]
    assert clean_name("01") == ""
    assert sound_caption("a01") == ""  # a lone letter and a take number say nothing


# ---------------------------------------------------------------------------------------------
# Licences from Debian copyright files

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: demo

Files: *
Copyright: 2016 Someone
License: MIT

Files:
 etc/doc/*
 etc/examples/*
Copyright: 2016 Someone
License: CC-BY-SA-4.0

Files: etc/samples/bass_hit_c.flac
Copyright: Someone Else
License: CC0
 Public domain dedication.

Files: plugins/calf/*
License: LGPL-2+
"""


def test_dep5_licences_per_file(tmp_path):
    doc = tmp_path / "usr/share/doc/demo"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(DEP5)
    info = read_copyright(tmp_path, "demo")
    assert info.license_for("usr/share/demo/samples/bass_hit_c.flac") == "CC0"
    assert info.license_for("usr/share/demo/samples/other.flac") == "MIT"
    assert info.license_for("usr/share/demo/examples/x.rb") == "CC-BY-SA-4.0"
    assert info.license_for("usr/share/demo/drums/kick.ogg") == "MIT"  # calf/* must not match


def test_free_text_copyright_after_licence_heading(tmp_path):
    doc = tmp_path / "usr/share/doc/game"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Credits: samples found in the public domain.\n\nLicense:\n"
        "        This program is free software under the GNU General Public License version 2\n"
        "        or at your option any later version.\n"
    )
    info = read_copyright(tmp_path, "game")
    assert info.fallback == "GPL-2+"
    assert info.license_for("usr/share/game/sounds/bow.ogg") == "GPL-2+"


def test_copyright_file_with_no_licence_found(tmp_path):
    doc = tmp_path / "usr/share/doc/odd"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text("Written by someone, who kept all rights to it.\nFiles\n  *\n")
    info = read_copyright(tmp_path, "odd")
    assert info.rules == () and info.fallback == "unknown (see copyright file)"
    assert info.license_for("usr/share/odd/sounds/x.ogg") == "unknown (see copyright file)"


def test_free_text_copyright_licence():
    # fluid-soundfont-gm is a declared system dependency; its copyright file is free text.
    info = read_copyright(Path("/"), "fluid-soundfont-gm")
    assert info.fallback == "MIT"


# ---------------------------------------------------------------------------------------------
# Rendering with the real fluidsynth


def _fundamental_hz(x: np.ndarray) -> float:
    """Frequency of the strongest spectral peak of a mono signal of shape (n,)."""
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    spec[freqs < 50] = 0
    return float(freqs[int(np.argmax(spec))])


def test_fluidsynth_is_installed():
    assert shutil.which("fluidsynth"), (
        "fluidsynth is a declared system dependency: apt-get install fluidsynth"
    )


def test_real_render_of_three_notes(tmp_path):
    sf2 = find_soundfont(tmp_path)
    notes = [Note(73, 60, 100), Note(73, 72, 100), Note(73, 72, 40)]  # flute: a strong fundamental
    out = render_batch(notes, sf2)
    assert out.shape == (3, round(SLOT_SECONDS * SAMPLE_RATE))
    assert out.dtype == np.float32
    held = out[:, 1600:20000]  # 0.1-1.25 s: the sustained part of each note
    assert _fundamental_hz(held[0]) == pytest.approx(261.6, rel=0.03)  # C4
    assert _fundamental_hz(held[1]) == pytest.approx(523.3, rel=0.03)  # C5
    rms = np.sqrt((held**2).mean(axis=1))
    assert rms[1] > 2 * rms[2], "velocity 100 should be much louder than velocity 40"
    assert np.abs(out[:, :50]).max() < 0.5 * np.abs(out).max(), "slots should start at the note onset"


def test_missing_fluidsynth_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SourceUnavailable, match="fluidsynth"):
        render_batch([Note(0, 60, 80)], Path("/nonexistent.sf2"))


def test_silent_note_goes_to_quarantine(tmp_path):
    # A note-on with velocity 0 is a note-off in MIDI: the render is silence.
    ds = fetch_notes(tmp_path, notes=[Note(0, 60, 0), Note(0, 60, 100)], progress=False)
    assert ds.quarantine_counts() == {"silent": 1}
    assert ds.quarantine[0].item == "p000_k060_v000"
    assert ds.summary()["unique_media"] == 1
    assert len(ds.pairs) == 3 and all(p.license.startswith("MIT") for p in ds.pairs)


def test_concept_split_holds_out_whole_instruments(tmp_path):
    notes = note_grid(programs=[0, 24, 40, 42, 56, 73], pitches=(48, 72), velocities=(80,), drums=False)
    ds = fetch_notes(tmp_path, notes=notes, seed=3, progress=False)
    assert ds.split_seed == 3
    split_of: dict[str, set[str]] = {}
    for p in ds.pairs:
        split_of.setdefault(p.concept, set()).add(p.split)
    assert all(len(s) == 1 for s in split_of.values()), split_of
    assert len(split_of) == 6
    assert {"train", "val", "test"} <= {next(iter(s)) for s in split_of.values()}
    # every note of a held-out instrument is held out: 2 notes x 3 captions
    test_concept = next(c for c, s in split_of.items() if s == {"test"})
    assert sum(p.concept == test_concept for p in ds.pairs) == 6
    assert {p.media_id for p in ds.pairs if p.split == "test"}.isdisjoint(
        p.media_id for p in ds.pairs if p.split == "train"
    )
    for p in ds.pairs:
        media = ds.media[p.media_id]
        assert Path(media.path).is_absolute() and media.path.endswith(".flac")
        assert p.group_id == p.media_id
        assert ds.media[p.caption_id].modality == "text"


def test_notes_cache_is_idempotent(tmp_path):
    notes = [Note(42, 48, 40), Note(11, 72, 120)]
    first = fetch_notes(tmp_path, notes=notes, progress=False)
    files = sorted((tmp_path / "notes").rglob("*.flac"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = fetch_notes(tmp_path, notes=notes, progress=False)
    assert [f.stat().st_mtime_ns for f in files] == mtimes, "cached notes were rendered again"
    assert second.pairs == first.pairs
    assert second.media == first.media


def test_custom_soundfont_needs_a_licence(tmp_path):
    with pytest.raises(ValueError, match="sf2_license"):
        fetch_notes(tmp_path, notes=[Note(0, 60, 80)], sf2=find_soundfont(tmp_path), progress=False)


def test_limit_picks_concepts_across_families():
    grid = note_grid(pitches=(60,), velocities=(80,))
    picked = pick_concepts(grid, 17, seed=0)
    concepts = {n.concept for n in picked}
    assert len(concepts) == 17
    families = {"drums" if n.drum else n.program // 8 for n in picked}
    assert len(families) == 17  # 16 GM families + drums, one concept each
    assert pick_concepts(grid, 17, seed=0) == picked
    assert {n.concept for n in pick_concepts(grid, 17, seed=1)} != concepts
    assert SOURCES["notes"] is fetch_notes and SOURCES["sounds"] is fetch_sounds


# ---------------------------------------------------------------------------------------------
# `sounds` on a package-shaped folder (the slow test downloads the real packages)

FAKE_COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
License: GPL-2+

Files: stereo/bell.oga stereo/complete.oga
License: CC-BY-3.0
"""


def _tone(path: Path, seconds: float, rate: int = 8000, fmt: str = "WAV") -> None:
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(str(path), 0.3 * np.sin(2 * np.pi * 440 * t), rate, format=fmt)


def _fake_package(cache: Path, name: str) -> Path:
    root = cache / "fake" / name / "root"
    snd = root / "usr/share/sounds/demo/stereo"
    drums = root / "usr/share/sounds/demo/drums"
    snd.mkdir(parents=True)
    drums.mkdir(parents=True)
    (root / "usr/share/doc" / name).mkdir(parents=True)
    (root / "usr/share/doc" / name / "copyright").write_text(FAKE_COPYRIGHT)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_text("not a sound")
    _tone(snd / "bell.oga", 0.5, fmt="OGG")
    _tone(snd / "dialog-warning.wav", 0.4)
    (snd / "window-attention.wav").symlink_to("dialog-warning.wav")
    _tone(drums / "snare01.flac", 0.3, fmt="FLAC")
    _tone(drums / "kick01.wav", 0.02)  # too short
    _tone(drums / "crash01.wav", 31.0, rate=1000)  # too long
    (drums / "broken01.ogg").write_bytes(b"OggS not really")
    return root


def test_sounds_from_a_package_folder(tmp_path, monkeypatch):
    pkg = SoundPackage("demo-sounds", ("usr/share/sounds/demo",), ("stereo",))
    monkeypatch.setattr("pipelines.sources.sounds.PACKAGES", (pkg,))
    root = _fake_package(tmp_path, "demo-sounds")
    ds = fetch_sounds(tmp_path, seed=5, progress=False, fetch=lambda name, cache: root)
    assert ds.split_seed == 5
    assert ds.quarantine_counts() == {"too_long": 1, "too_short": 1, "undecodable": 1}
    assert not (root / "usr/bin/tool").exists(), "non-sound files should be pruned"
    assert (root / "usr/share/doc/demo-sounds/copyright").exists()
    captions = {ds.media[p.caption_id].text: p for p in ds.pairs}
    assert set(captions) == {"a bell", "a dialog warning", "a window attention", "a snare drum sound"}
    assert captions["a bell"].license == "CC-BY-3.0"
    assert captions["a snare drum sound"].license == "GPL-2+"
    assert ds.media[captions["a snare drum sound"].raw_caption_id].text == "drums/snare01.flac"
    # the symlink is the same audio: one media item, two captions, one concept and split
    warn, attention = captions["a dialog warning"], captions["a window attention"]
    assert warn.media_id == attention.media_id
    assert (warn.concept, warn.split) == (attention.concept, attention.split)
    assert ds.summary()["unique_media"] == 3
    for p in ds.pairs:
        assert Path(ds.media[p.media_id].path).is_absolute()
        assert p.source == "debian:demo-sounds"
    again = fetch_sounds(tmp_path, seed=5, progress=False, fetch=lambda name, cache: root)
    assert again.pairs == ds.pairs


def test_sounds_rejects_unknown_package(tmp_path):
    with pytest.raises(ValueError, match="unknown sound packages"):
        fetch_sounds(tmp_path, packages=["no-such-package"], progress=False)


@pytest.mark.slow
def test_fetch_real_sounds_with_limit(tmp_path):
    ds = fetch_sounds(
        tmp_path, limit=45, packages=["sound-theme-freedesktop", "sonic-pi-samples"], progress=False
    )
    s = ds.summary()
    assert len(ds.pairs) + len(ds.quarantine) == 45
    assert s["unique_media"] >= 30
    lic = {ds.media[p.caption_id].text: p.license for p in ds.pairs}
    assert lic["a bell"] == "CC-BY-3.0"  # stereo/bell.oga in the DEP-5 file
    assert lic["a service login"] == "GPL-2"
    sonic = [p for p in ds.pairs if p.source == "debian:sonic-pi-samples"]
    # per-file DEP-5 paragraphs name the freesound samples (CC0); the rest fall under "Files: *"
    assert {p.license for p in sonic} == {"CC0", "MIT"}
    assert lic["an ambient choir"] == "CC0" and lic["an ambient sauna"] == "MIT"
    assert {q.reason for q in ds.quarantine} <= {"too_short", "too_long", "undecodable"}
    # dialog-error.oga is a symlink to dialog-warning.oga: one media item under two captions
    media_of = {ds.media[p.caption_id].text: p.media_id for p in ds.pairs}
    assert media_of["a dialog error"] == media_of["a dialog warning"]
    assert len({p.split for p in ds.pairs}) == 3
    for p in ds.pairs:
        assert ds.media[p.raw_caption_id].text.endswith((".oga", ".flac"))
        assert Path(ds.media[p.media_id].path).is_file()
