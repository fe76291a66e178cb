"""Emergent retrieval between two media modalities that were each aligned to text only.

A sound and a picture are a match when they show the same thing: their concepts' names agree
(`match_concepts`). The sound of a violin note and the violin emoji were never seen together in
training; if both adapters map into one space through a shared, frozen text side, a violin note
should still land near the violin pictures. Scored with the project's metric code
(evaluation.retrieval), every item of one side a query over every item of the other, a hit at K when
any item of the same concept is in the top K:

- direct: query embedding against gallery embeddings in the shared space;
- two-step: query -> its nearest caption in the query dataset's caption bank -> that caption's
  embedding against the gallery (audio -> text -> image), the route that needs no shared space;
- chance: a random ranking of the same gallery for the same queries.

Names: a concept that reads as words ("violin", "drum: acoustic snare") is named by its words after
the last ": "; a code ("1F3BB", an emoji's hex code) by its shortest caption ("violin"). A picture
named in MATCHES matches the sounds whose names contain one of its keywords as whole words
("musical keyboard" -> "bright acoustic piano", "telephone" -> "telephone ring"), and any picture
matches the sounds of exactly its name (a dataset whose two media name their concepts alike); a sound
that several pictures match goes to the first of the table. The table is explicit on purpose: matching any picture name
found inside a sound name pairs a rock with a "rock organ" and a church with a "church organ".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from evaluation.retrieval import DEFAULT_KS, RetrievalResult, chance_levels, retrieval_metrics

# Picture name -> words that name the same thing in a sound's name (General MIDI instrument, drum
# and sound-effect names; emoji short names). Ordered: a sound that matches two entries goes to the
# first ("taiko drum" is a long drum).
MATCHES: dict[str, tuple[str, ...]] = {
    "long drum": ("conga", "bongo", "taiko"),
    "drum": ("drum", "snare", "tom"),
    "musical keyboard": ("piano",),
    "piano": ("piano",),
    "guitar": ("guitar",),
    "violin": ("violin", "fiddle"),
    "trumpet": ("trumpet",),
    "saxophone": ("sax", "saxophone"),
    "accordion": ("accordion",),
    "banjo": ("banjo",),
    "flute": ("flute",),
    "maracas": ("maracas",),
    "bell": ("bell", "bells"),
    "harp": ("harp",),
    "trombone": ("trombone",),
    "telephone": ("telephone",),
    "helicopter": ("helicopter",),
    "bird": ("bird",),
    "clapping hands": ("applause", "clap"),
}

_CODE = re.compile(r"^[0-9A-Fa-f]+(?:-[0-9A-Fa-f]+)*$")


def concept_name(concept: str, captions: Iterable[str] = ()) -> str:
    """A concept's name: its words (after the last ': ') or, for a code, its shortest caption."""
    words = concept.rsplit(": ", 1)[-1].strip()
    if words and not _CODE.match(words):
        return words.lower()
    shortest = min((c for c in captions if c and c.strip()), key=lambda c: (len(c), c), default=None)
    return (shortest or concept).strip().lower()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _contains(name: str, phrase: str) -> bool:
    """Whether the words of `phrase` appear in `name` consecutively, as whole words."""
    n, p = _words(name), _words(phrase)
    return bool(p) and any(n[i : i + len(p)] == p for i in range(len(n) - len(p) + 1))


def match_concepts(
    pictures: Mapping[str, str], sounds: Mapping[str, str], table: Mapping[str, tuple[str, ...]] = MATCHES
) -> tuple[dict[str, str], dict[str, str]]:
    """(picture concept -> label, sound concept -> label) for the concepts that match one another.

    `pictures` and `sounds` map concept -> name (concept_name); `table` maps a picture name to the
    keywords of its sounds. The label is the picture name; every label returned has at least one
    picture and one sound."""
    names = set(pictures.values())
    sound_label: dict[str, str] = {}
    for concept, sound in sounds.items():
        if sound in names:  # the very same name
            sound_label[concept] = sound
            continue
        for name, keywords in table.items():
            if name in names and any(_contains(sound, k) for k in keywords):
                sound_label[concept] = name
                break
    labels = set(sound_label.values())
    picture_label = {c: n for c, n in pictures.items() if n in labels}
    return picture_label, sound_label


def label_pairs(gallery_labels: Sequence[str], query_labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(gallery index, query index) of every pair with the same label, as int64 arrays."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(gallery_labels):
        by_label.setdefault(label, []).append(i)
    gi, qi = [], []
    for j, label in enumerate(query_labels):
        for i in by_label.get(label, ()):
            gi.append(i)
            qi.append(j)
    if not gi:
        raise ValueError("no query shares a label with the gallery: nothing to score")
    return np.asarray(gi, dtype=np.int64), np.asarray(qi, dtype=np.int64)


def nearest_rows(queries: np.ndarray, bank: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Index of each query's nearest row of `bank` by dot product (the first on ties)."""
    if len(bank) == 0:
        raise ValueError("the caption bank is empty")
    out = np.empty(len(queries), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        out[s : s + chunk] = np.argmax(queries[s : s + chunk] @ bank.T, axis=1)
    return out


def direction_names(a: str, b: str) -> tuple[str, str]:
    """Metric direction names of modalities a and b: ("audio", "image") -> ("a2i", "i2a")."""
    return f"{a[0]}2{b[0]}", f"{b[0]}2{a[0]}"


def emergent_metrics(
    a_emb: np.ndarray,
    a_labels: Sequence[str],
    b_emb: np.ndarray,
    b_labels: Sequence[str],
    a_bank: np.ndarray,
    b_bank: np.ndarray,
    names: tuple[str, str] = ("audio", "image"),
    ks: Iterable[int] = DEFAULT_KS,
) -> tuple[dict[str, float], dict[str, RetrievalResult]]:
    """Retrieval between modality a (e.g. audio) and b (e.g. image) through the shared space.

    a_emb [Na, D], b_emb [Nb, D]: L2-normalised embeddings of the two sides' items, with one label
    each (a concept's label from match_concepts); a_bank / b_bank: embeddings of the caption banks of
    the two datasets, for the two-step route. Returns ({metric: value}, {"direct", "a_via_text",
    "b_via_text": RetrievalResult}), metric names as `a2i_recall_at_1`, `twostep_a2i_recall_at_1`,
    `chance_a2i_recall_at_1` (and the other direction, ranks, item counts).
    """
    a_emb, b_emb = np.asarray(a_emb, np.float32), np.asarray(b_emb, np.float32)
    ab, ba = direction_names(*names)
    gi, qi = label_pairs(b_labels, a_labels)  # b items are the "items", a items the "texts"
    ks = tuple(ks)
    direct = retrieval_metrics(b_emb, a_emb, gi, qi, ks=ks)
    chance = chance_levels(gi, qi, len(b_emb), len(a_emb), ks)
    # a -> its nearest caption -> b: that caption's embedding queries the b items.
    a_pivot = np.asarray(a_bank, np.float32)[nearest_rows(a_emb, np.asarray(a_bank, np.float32))]
    via_a = retrieval_metrics(b_emb, a_pivot, gi, qi, ks=ks)
    # b -> its nearest caption -> a: that caption's embedding queries the a items.
    b_pivot = np.asarray(b_bank, np.float32)[nearest_rows(b_emb, np.asarray(b_bank, np.float32))]
    via_b = retrieval_metrics(b_pivot, a_emb, gi, qi, ks=ks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"{ab}_recall_at_{k}"] = direct.t2i_recall[k]
        out[f"{ba}_recall_at_{k}"] = direct.i2t_recall[k]
        out[f"twostep_{ab}_recall_at_{k}"] = via_a.t2i_recall[k]
        out[f"twostep_{ba}_recall_at_{k}"] = via_b.i2t_recall[k]
        out[f"chance_{ab}_recall_at_{k}"] = chance["t2i"][k]
        out[f"chance_{ba}_recall_at_{k}"] = chance["i2t"][k]
    out[f"{ab}_median_rank"] = direct.t2i_median_rank
    out[f"{ba}_median_rank"] = direct.i2t_median_rank
    out[f"{names[0]}_items"] = float(len(a_emb))
    out[f"{names[1]}_items"] = float(len(b_emb))
    out["concepts"] = float(len(set(a_labels) & set(b_labels)))
    return out, {"direct": direct, "a_via_text": via_a, "b_via_text": via_b}


def emergent_table_markdown(values: Mapping[str, tuple[float, float | None]], names: tuple[str, str]) -> str:
    """A markdown table of direct vs two-step vs chance Recall@K (percent) both ways; `values` maps
    metric -> (mean, std or None)."""
    ab, ba = direction_names(*names)

    def cell(metric: str) -> str:
        if metric not in values:
            return ""
        mean, std = values[metric]
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std and std >= 5e-4 else "")

    ks = sorted({int(m.rsplit("_", 1)[1]) for m in values if m.startswith(f"{ab}_recall_at_")})
    head = "| route | " + " | ".join(f"{d} R@{k}" for d in (ab, ba) for k in ks) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(ks))]
    for label, prefix in (("direct, shared space", ""), ("two-step, via nearest caption", "twostep_"),
                          ("chance", "chance_")):  # fmt: skip
        lines.append(
            f"| {label} | "
            + " | ".join(cell(f"{prefix}{d}_recall_at_{k}") for d in (ab, ba) for k in ks)
            + " |"
        )
    return "\n".join(lines)


def plot_emergent(values: Mapping[str, tuple[float, float | None]], names: tuple[str, str], path) -> None:
    """Grouped bars of Recall@K both ways, direct vs two-step vs chance, with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ab, ba = direction_names(*names)
    ks = sorted({int(m.rsplit("_", 1)[1]) for m in values if m.startswith(f"{ab}_recall_at_")})
    cols = [(d, k) for d in (ab, ba) for k in ks]
    routes = (("direct", ""), ("two-step", "twostep_"), ("chance", "chance_"))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(routes)
    for r, (label, prefix) in enumerate(routes):
        got = [values.get(f"{prefix}{d}_recall_at_{k}", (0.0, None)) for d, k in cols]
        ax.bar(
            np.arange(len(cols)) + (r - 1) * width,
            [100 * m for m, _ in got],
            width,
            yerr=[100 * (s or 0.0) for _, s in got],
            capsize=2,
            label=label,
        )
    ax.set_xticks(np.arange(len(cols)), [f"{d} R@{k}" for d, k in cols])
    ax.set_ylabel("Recall (%)")
    ax.set_title(
        f"Emergent {names[0]} <-> {names[1]} retrieval (never trained on {names[0]}-{names[1]} pairs)"
    )
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
