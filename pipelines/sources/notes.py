"""The `notes` source: General MIDI instrument notes rendered with FluidSynth, captioned by instrument.

A grid of GM program x pitch x velocity (plus the GM drum kit) is written as Standard MIDI
Files (with mido) and rendered with the `fluidsynth` command line and the FluidR3 General MIDI
soundfont (Debian `fluid-soundfont-gm`) to 16 kHz mono FLAC files in the cache. Many notes share
one MIDI file and one fluidsynth process (each note in its own time slot, all sound cut at the slot
end, reverb and chorus off), and the render is cut back into one file per note, so the cost of
loading the 140 MB soundfont is paid once per batch.

Captions come from the GM instrument and drum names (pretty_midi's tables, reworded where a name
does not read well in a sentence): "a cello playing a low note softly", three phrasings per note.
The concept is the instrument: every note of one instrument lands in one split. Renders that come
out silent go to quarantine with reason "silent".

Run: `python -m pipelines.sources.notes CACHE_DIR [LIMIT]` renders and prints the summary and speed.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mido
import numpy as np
import pretty_midi
import soundfile
from tqdm import tqdm

from fusion.data import Dataset, MediaItem, Pair, content_id
from fusion.data.builder import default_splits
from pipelines.sources.common import SourceUnavailable, debian_package
from pipelines.sources.sounds import read_copyright, with_article

SOURCE = "notes"
SAMPLE_RATE = 16_000
SOUNDFONT_PACKAGE = "fluid-soundfont-gm"
SYSTEM_SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
DRUM_CHANNEL = 9

# MIDI timing: 480 ticks per quarter at 120 bpm (500,000 us per quarter) is 960 ticks per second.
TICKS_PER_QUARTER = 480
US_PER_QUARTER = 500_000
TICKS_PER_SECOND = TICKS_PER_QUARTER * 1_000_000 // US_PER_QUARTER

HOLD_SECONDS = 1.5  # key held down
SLOT_SECONDS = 2.0  # hold + release tail; all sound is cut at the end of the slot
SILENCE_PEAK = 10 ** (-50 / 20)  # below -50 dBFS peak a render counts as silent

# The 128 General MIDI program names (program numbers from 0), as pretty_midi spells them.
GM_PROGRAMS: tuple[str, ...] = tuple(pretty_midi.program_to_instrument_name(p) for p in range(128))

# How a caption names the instrument where the GM name does not read well in a sentence.
_CAPTION_NAMES: dict[int, str] = {
    1: "bright acoustic piano",
    3: "honky-tonk piano",
    4: "electric piano",
    5: "FM electric piano",
    24: "nylon-string acoustic guitar",
    25: "steel-string acoustic guitar",
    26: "jazz electric guitar",
    27: "clean electric guitar",
    28: "muted electric guitar",
    31: "guitar playing harmonics",
    33: "fingered electric bass",
    34: "picked electric bass",
    36: "slap bass",
    37: "second slap bass",
    38: "synth bass",
    39: "second synth bass",
    44: "string section playing tremolo",
    45: "string section playing pizzicato",
    48: "string ensemble",
    49: "slow string ensemble",
    50: "synth strings",
    51: "second synth strings",
    52: "choir singing aah",
    53: "voice singing ooh",
    54: "synth voice",  # pretty_midi: "Synth Choir"
    62: "synth brass",
    63: "second synth brass",
    80: "square wave synth lead",
    81: "sawtooth synth lead",
    82: "calliope synth lead",
    83: "chiff synth lead",
    84: "charang synth lead",
    85: "voice synth lead",
    86: "fifths synth lead",
    87: "bass and lead synth",
    88: "new age synth pad",
    89: "warm synth pad",
    90: "polysynth pad",
    91: "choir synth pad",
    92: "bowed synth pad",
    93: "metallic synth pad",
    94: "halo synth pad",
    95: "sweep synth pad",
    96: "rain synth effect",
    97: "soundtrack synth effect",
    98: "crystal synth effect",
    99: "atmosphere synth effect",
    100: "brightness synth effect",
    101: "goblins synth effect",
    102: "echoes synth effect",
    103: "sci-fi synth effect",
    107: "koto",
    111: "shehnai",
    112: "tinkle bell",
    113: "agogo bell",
    119: "reverse cymbal",
}
# Programs that are noises rather than pitched instruments: captions say "the sound of ...".
_EFFECT_PROGRAMS = frozenset(range(96, 104)) | frozenset(range(119, 128))

# How a caption names a GM drum where pretty_midi's name ("Closed Hi Hat", "Crash Cymbal 2") does not
# read well in a sentence; the other drums are pretty_midi's names in lower case.
_DRUM_CAPTION_NAMES: dict[int, str] = {
    36: "bass drum",
    42: "closed hi-hat",
    44: "pedal hi-hat",
    46: "open hi-hat",
    48: "high-mid tom",
    49: "crash cymbal",
    51: "ride cymbal",
    52: "Chinese cymbal",
    57: "second crash cymbal",
    59: "second ride cymbal",
    60: "high bongo",
    62: "muted high conga",
    63: "open high conga",
    76: "high wood block",
    78: "muted cuica",
    80: "muted triangle",
}
# The GM 1 percussion key map on channel 10 (keys 35-81): key -> caption name.
GM_DRUMS: dict[int, str] = {
    key: _DRUM_CAPTION_NAMES.get(key, name.lower())
    for key in range(128)
    if (name := pretty_midi.note_number_to_drum_name(key))
}

# Pitch grid: MIDI key -> register word. C2..C6 covers every GM melodic instrument's useful range.
REGISTERS: dict[int, str] = {36: "very low", 48: "low", 60: "middle", 72: "high", 84: "very high"}
VELOCITIES: tuple[int, ...] = (40, 80, 120)
# pretty_midi spells every black key as a sharp ("D#4"); captions say "E flat4".
_NOTE_SPELLING = {"C#": "C sharp", "D#": "E flat", "F#": "F sharp", "G#": "A flat", "A#": "B flat"}


@dataclass(frozen=True, order=True)
class Note:
    """One note of the grid: a GM program (0-127) at a MIDI key and velocity, or a drum when `drum`."""

    program: int
    pitch: int
    velocity: int
    drum: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.program <= 127 or not 0 <= self.pitch <= 127 or not 0 <= self.velocity <= 127:
            raise ValueError(f"MIDI values out of range in {self}")
        if self.drum and self.pitch not in GM_DRUMS:
            raise ValueError(f"key {self.pitch} is not in the GM drum map (35-81)")

    @property
    def key(self) -> str:
        """File-name key: p042_k060_v080 (program, key, velocity) or drum_k038_v080."""
        head = "drum" if self.drum else f"p{self.program:03d}"
        return f"{head}_k{self.pitch:03d}_v{self.velocity:03d}"

    @property
    def concept(self) -> str:
        """What a split holds out whole: the instrument (or drum sound)."""
        return f"drum: {GM_DRUMS[self.pitch]}" if self.drum else instrument_name(self.program)


def instrument_name(program: int) -> str:
    """Caption name of a GM program (0-based): 42 -> "cello", 80 -> "square wave synth lead"."""
    if not 0 <= program <= 127:
        raise ValueError(f"GM program must be in 0..127, got {program}")
    return _CAPTION_NAMES.get(program, GM_PROGRAMS[program].lower())


def _dynamics(velocity: int) -> tuple[str, str, str]:
    """(adverb, adjective, loudness word) for a velocity: 40 -> ("softly", "soft", "quiet")."""
    if velocity < 56:
        return "softly", "soft", "quiet"
    if velocity < 96:
        return "at medium volume", "moderately loud", "medium loudness"
    return "loudly", "loud", "loud"


def _register(pitch: int) -> str:
    """Register word of a key: the nearest key of REGISTERS decides (60 -> "middle")."""
    return REGISTERS[min(REGISTERS, key=lambda k: abs(k - pitch))]


def note_name(pitch: int) -> str:
    """Scientific pitch name of a MIDI key: 60 -> "C4", 61 -> "C sharp4", 63 -> "E flat4".

    Black keys are spelled as the captions always had them (no space before the octave).
    """
    name = pretty_midi.note_number_to_name(pitch)
    letter = name.rstrip("-0123456789")
    return f"{_NOTE_SPELLING.get(letter, letter)}{name[len(letter) :]}"


def note_captions(note: Note) -> list[str]:
    """Three phrasings of one note, e.g. program 42, key 48, velocity 40 ->
    ["a cello playing a low note softly", "a soft low C3 on the cello", "cello, low pitch, quiet"]."""
    adverb, adjective, loudness = _dynamics(note.velocity)
    if note.drum:
        name = GM_DRUMS[note.pitch]
        return [
            f"{with_article(name)} hit {adverb}",
            f"{with_article(adjective)} {name} hit from a drum kit",
            f"{name}, percussion, {loudness}",
        ]
    name = instrument_name(note.program)
    register = _register(note.pitch)
    if note.program in _EFFECT_PROGRAMS:
        return [
            f"the sound of {with_article(name)}, {register} pitched and {loudness}",
            f"{with_article(adjective)} {register} {name} sound",
            f"{name}, {register} pitch, {loudness}",
        ]
    return [
        f"{with_article(name)} playing {with_article(register)} note {adverb}",
        f"{with_article(adjective)} {register} {note_name(note.pitch)} on the {name}",
        f"{name}, {register} pitch, {loudness}",
    ]


# ---------------------------------------------------------------------------------------------
# Standard MIDI File writer


def write_smf(notes: Sequence[Note], hold_s: float = HOLD_SECONDS, slot_s: float = SLOT_SECONDS) -> bytes:
    """A format-0 Standard MIDI File (written with mido) that plays `notes` one per slot of `slot_s` seconds.

    Each slot: program change (melodic notes, channel 1) at its start, note on, note off after
    `hold_s`, and 25 ms before the slot ends All Sound Off (controller 120) so that no release
    tail leaks into the next slot. Drums play on channel 10. The track ends one slot after the last note.
    """
    if not notes:
        raise ValueError("write_smf needs at least one note")
    if not 0 < hold_s < slot_s - 0.025:
        raise ValueError(f"hold ({hold_s} s) must be positive and shorter than the slot ({slot_s} s)")
    slot_ticks = round(slot_s * TICKS_PER_SECOND)
    hold_ticks = round(hold_s * TICKS_PER_SECOND)
    cut_ticks = round(0.025 * TICKS_PER_SECOND)
    events: list[tuple[int, mido.Message | mido.MetaMessage]] = [
        (0, mido.MetaMessage("set_tempo", tempo=US_PER_QUARTER))
    ]
    for i, note in enumerate(notes):
        start = i * slot_ticks
        ch = DRUM_CHANNEL if note.drum else 0
        if not note.drum:
            events.append((start, mido.Message("program_change", channel=ch, program=note.program)))
        events.append((start, mido.Message("note_on", channel=ch, note=note.pitch, velocity=note.velocity)))
        events.append((start + hold_ticks, mido.Message("note_off", channel=ch, note=note.pitch, velocity=0)))
        # 25 ms before the next slot: fluidsynth acts on events per 64-sample block, and the cut
        # must land before the next note-on.
        events.append(
            (start + slot_ticks - cut_ticks, mido.Message("control_change", channel=ch, control=120, value=0))
        )
    events.append((len(notes) * slot_ticks, mido.MetaMessage("end_of_track")))
    track = mido.MidiTrack()
    now = 0
    for tick, msg in events:  # already in time order: appended slot by slot
        track.append(msg.copy(time=tick - now))
        now = tick
    buf = io.BytesIO()
    mido.MidiFile(type=0, ticks_per_beat=TICKS_PER_QUARTER, tracks=[track]).save(file=buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Rendering


def find_soundfont(cache: Path) -> Path:
    """The FluidR3 GM soundfont: the installed one, else unpacked from the Debian package (no root)."""
    if SYSTEM_SOUNDFONT.is_file():
        return SYSTEM_SOUNDFONT
    root = debian_package(SOUNDFONT_PACKAGE, cache)
    found = sorted(root.rglob("FluidR3_GM.sf2"))
    if not found:
        raise SourceUnavailable(f"{SOUNDFONT_PACKAGE} holds no FluidR3_GM.sf2")
    return found[0]


def soundfont_license(cache: Path) -> str:
    """Licence of FluidR3_GM from the Debian copyright file of fluid-soundfont-gm (MIT).

    Read from the installed package, or from the downloaded one where the system has no copy
    (minimal images often drop /usr/share/doc).
    """
    installed = Path("/usr/share/doc") / SOUNDFONT_PACKAGE / "copyright"
    root = Path("/") if installed.is_file() else debian_package(SOUNDFONT_PACKAGE, cache)
    return read_copyright(root, SOUNDFONT_PACKAGE).fallback


def _fluidsynth() -> str:
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise SourceUnavailable(
            "the `fluidsynth` command is not installed; it is a declared system dependency "
            "(Debian: apt-get install fluidsynth)"
        )
    return exe


# Reverb and chorus off: their tails would outlive the All Sound Off that ends each slot.
# Gain 1.0 (fluidsynth's default is 0.2) puts the loudest GM notes near -2 dBFS without clipping.
_SYNTH_FLAGS = ("-R", "0", "-C", "0", "-g", "1.0")


def _render_tag(sf2: Path) -> str:
    """Cache folder name for a soundfont and the render settings: a change to either renders anew."""
    st = sf2.stat()
    key = f"{sf2.name}:{st.st_size}:{SAMPLE_RATE}:{HOLD_SECONDS}:{SLOT_SECONDS}:{' '.join(_SYNTH_FLAGS)}"
    return f"{sf2.stem}-{content_id('settings', key)[:8]}"


def render_batch(notes: Sequence[Note], sf2: Path) -> np.ndarray:
    """Renders notes in one fluidsynth run.

    Returns float32 array of shape (len(notes), SLOT_SECONDS * SAMPLE_RATE): one mono slot per note.
    """
    exe = _fluidsynth()
    slot = round(SLOT_SECONDS * SAMPLE_RATE)
    with tempfile.TemporaryDirectory(prefix="fusemix-notes-") as tmp:
        mid, wav = Path(tmp) / "batch.mid", Path(tmp) / "batch.wav"
        mid.write_bytes(write_smf(notes))
        cmd = [exe, "-ni", "-q", *_SYNTH_FLAGS, "-r", str(SAMPLE_RATE), "-F", str(wav)]
        proc = subprocess.run([*cmd, str(sf2), str(mid)], capture_output=True, text=True)
        if proc.returncode != 0 or not wav.exists():
            raise RuntimeError(
                f"fluidsynth failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}"
            )
        audio, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise RuntimeError(f"fluidsynth wrote {rate} Hz, asked for {SAMPLE_RATE}")
    mono = audio.mean(axis=1)
    need = slot * len(notes)
    if mono.shape[0] < need:  # the player may stop a block early: pad the tail with silence
        mono = np.pad(mono, (0, need - mono.shape[0]))
    return mono[:need].reshape(len(notes), slot)


def _flac_bytes(samples: np.ndarray) -> bytes:
    """16-bit FLAC of a mono float signal of shape (n,)."""
    buf = io.BytesIO()
    soundfile.write(buf, np.clip(samples, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def render_notes(
    notes: Sequence[Note], out_dir: Path, sf2: Path, *, batch: int = 64, progress: bool = True
) -> dict[Note, Path]:
    """Renders every note whose FLAC is not in `out_dir` yet; returns note -> file for all notes.

    Idempotent: existing files are kept (written atomically, so a file that exists is whole).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {n: out_dir / f"{n.key}.flac" for n in notes}
    todo = [n for n in notes if not paths[n].exists()]
    bar = tqdm(total=len(todo), desc="notes:render", unit="note", disable=not progress or not todo)
    for i in range(0, len(todo), batch):
        chunk = todo[i : i + batch]
        for note, samples in zip(chunk, render_batch(chunk, sf2), strict=True):
            # per-process temporary name: two fetches sharing a cache never write one file together
            tmp = paths[note].with_name(f".{paths[note].name}.{os.getpid()}.partial")
            tmp.write_bytes(_flac_bytes(samples))
            tmp.replace(paths[note])
        bar.update(len(chunk))
    bar.close()
    return paths


# ---------------------------------------------------------------------------------------------
# The dataset


def note_grid(
    programs: Iterable[int] | None = None,
    pitches: Iterable[int] = tuple(REGISTERS),
    velocities: Iterable[int] = VELOCITIES,
    drums: bool = True,
) -> list[Note]:
    """Every (program, pitch, velocity) note plus, with `drums`, every GM drum at each velocity."""
    progs = range(128) if programs is None else programs
    pitches, velocities = tuple(pitches), tuple(velocities)
    grid = [Note(p, k, v) for p in progs for k in pitches for v in velocities]
    if drums:
        grid += [Note(0, k, v, drum=True) for k in GM_DRUMS for v in velocities]
    return grid


def pick_concepts(notes: Sequence[Note], limit: int | None, seed: int) -> list[Note]:
    """Keeps the notes of `limit` concepts, chosen round-robin over GM families (drums are a family).

    So that a small demo still spans pianos, strings, brass, synths and drums; the instrument
    taken from each family is drawn with `seed`.
    """
    if limit is None:
        return list(notes)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    by_family: dict[str, list[str]] = {}
    for n in sorted(notes):
        fam = "drums" if n.drum else pretty_midi.program_to_instrument_class(n.program).lower()
        members = by_family.setdefault(fam, [])
        if n.concept not in members:
            members.append(n.concept)
    rng = random.Random(seed)
    for members in by_family.values():
        rng.shuffle(members)
    chosen: list[str] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(m) for m in by_family.values()):
        for fam in sorted(by_family):
            if depth < len(by_family[fam]) and len(chosen) < limit:
                chosen.append(by_family[fam][depth])
        depth += 1
    keep = set(chosen)
    return [n for n in notes if n.concept in keep]


def fetch_notes(
    cache: Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    notes: Sequence[Note] | None = None,
    sf2: Path | None = None,
    sf2_license: str | None = None,
) -> Dataset:
    """Builds the `notes` dataset: renders (or reuses) one FLAC per note under `cache`/notes/.

    `limit` keeps that many concepts (instruments / drum sounds); `notes` replaces the default
    grid (note_grid()). `sf2` renders with another soundfont, whose licence `sf2_license`
    must then name. Silent renders are quarantined with reason "silent".
    """
    cache = Path(cache).resolve()
    grid = pick_concepts(note_grid() if notes is None else list(notes), limit, seed)
    if sf2 is None:
        sf2 = find_soundfont(cache)
        lic = f"{soundfont_license(cache)} (FluidR3_GM soundfont, Debian {SOUNDFONT_PACKAGE})"
    elif sf2_license:
        sf2, lic = Path(sf2).resolve(), sf2_license
    else:
        raise ValueError(f"fetch_notes with a custom soundfont ({sf2}) needs sf2_license")
    src = f"fluidsynth:{sf2.name}"
    paths = render_notes(grid, cache / "notes" / _render_tag(sf2), sf2, progress=progress)
    ds = Dataset(SOURCE, split_seed=seed)
    splits = default_splits({n.concept for n in grid}, seed)
    for note in tqdm(grid, desc="notes:index", unit="note", disable=not progress):
        path = paths[note]
        data = path.read_bytes()
        samples, _ = soundfile.read(io.BytesIO(data), dtype="float32")
        peak = float(np.abs(samples).max()) if samples.size else 0.0
        if peak < SILENCE_PEAK:
            level = 20 * np.log10(peak) if peak > 0 else float("-inf")
            ds.reject(SOURCE, note.key, "silent", f"peak {level:.1f} dBFS ({note.concept})")
            continue
        mid = ds.add_media(
            MediaItem(content_id("audio", data), "audio", path=str(path), source=src, license=lic)
        )
        for caption in note_captions(note):
            cap_id = ds.add_text(caption, source=src, license=lic)
            ds.pairs.append(
                Pair(mid, cap_id, splits[note.concept], mid, source=src, license=lic, concept=note.concept)
            )
    return ds


# Merged by the owner into pipelines.sources.SOURCES.
SOURCES_NOTES = {"notes": fetch_notes}


if __name__ == "__main__":
    _t0 = time.perf_counter()
    _ds = fetch_notes(Path(sys.argv[1]), limit=int(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(_ds.summary(), _ds.quarantine_counts(), f"{time.perf_counter() - _t0:.1f} s")
