"""Emergent media<->media retrieval (evaluation.crossmodal): concept names and matching, hand-computed
Recall@K for the direct route, the two-step route through the nearest caption, and chance.

    .venv/bin/pytest -q tests/evaluation/test_crossmodal.py
"""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.crossmodal import (
    concept_name,
    direction_names,
    emergent_metrics,
    emergent_table_markdown,
    label_pairs,
    match_concepts,
    nearest_rows,
)
from evaluation.retrieval import chance_recall


def test_concept_names_use_words_or_the_shortest_caption_of_a_code():
    assert concept_name("violin", ["a violin playing a low note softly"]) == "violin"
    assert concept_name("drum: acoustic snare", []) == "acoustic snare"
    assert concept_name("1F3BB", ["a violin emoji: instrument, music", "violin"]) == "violin"
    assert (
        concept_name("1F469-200D-1F9BD", ["woman with cane", "a woman with a white cane"])
        == "woman with cane"
    )
    assert concept_name("1F3BB", []) == "1f3bb"  # a code without captions keeps its code


def test_pictures_match_sounds_by_the_keywords_of_the_table():
    pictures = {
        "1F3B9": "musical keyboard",
        "1FA98": "long drum",
        "1F941": "drum",
        "260E": "telephone",
        "1F431": "cat",
        "1F3BB": "violin",
        "1FAA8": "rock",
        "1F415": "dog",
    }
    sounds = {
        "bright acoustic piano": "bright acoustic piano",
        "taiko drum": "taiko drum",  # both drums match: the first entry of INSTRUMENTS wins
        "drum: acoustic snare": "acoustic snare",
        "telephone ring": "telephone ring",
        "category tone": "category tone",  # "cat" is not in the table (nor a whole word of it)
        "rock organ": "rock organ",  # not a rock: only the table's keywords match
        "cello": "cello",
        "dog": "dog",  # the same name as a picture, not in the table
    }
    pic, snd = match_concepts(pictures, sounds)
    assert snd == {
        "bright acoustic piano": "musical keyboard",
        "taiko drum": "long drum",
        "drum: acoustic snare": "drum",
        "telephone ring": "telephone",
        "dog": "dog",
    }
    # Only pictures with a matching sound keep a label: no cat, rock or violin (no violin sound here).
    assert pic == {
        "1F3B9": "musical keyboard",
        "1FA98": "long drum",
        "1F941": "drum",
        "260E": "telephone",
        "1F415": "dog",
    }


def test_label_pairs_and_nearest_rows():
    gi, qi = label_pairs(["a", "b", "a"], ["a", "c", "b"])
    assert sorted(zip(gi.tolist(), qi.tolist(), strict=True)) == [(0, 0), (1, 2), (2, 0)]
    with pytest.raises(ValueError, match="no query shares a label"):
        label_pairs(["a"], ["b"])
    bank = np.eye(3, dtype=np.float32)
    assert nearest_rows(np.array([[0.1, 0.9, 0.0], [0.0, 0.2, 0.3]], np.float32), bank).tolist() == [1, 2]
    assert direction_names("audio", "image") == ("a2i", "i2a")


def _unit(*rows):
    x = np.array(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_emergent_metrics_by_hand():
    # Two concepts. Images: i0, i1 of "x", i2 of "y". Sounds: a0 of "x", a1 of "y".
    images = _unit([1, 0, 0], [0.9, 0.1, 0], [0, 1, 0])
    img_labels = ["x", "x", "y"]
    # a0 sits nearest to i2 (wrong, 0.99), then i1 (right, 0.21); a1 nearest to i2 (right).
    sounds = _unit([0.1, 1, 0.05], [0, 1, 0.2])
    snd_labels = ["x", "y"]
    # Caption banks: the sounds' bank has a caption at "x" that a0 is nearest to (a0 has 0.1 on x,
    # the y caption is farther because it points at the third axis).
    a_bank = _unit([1, 0.2, 0], [0, 0, 1])
    b_bank = _unit([1, 0, 0], [0, 1, 0])
    values, results = emergent_metrics(sounds, snd_labels, images, img_labels, a_bank, b_bank, ks=(1, 2))
    # Direct a->i: a0's best correct image (i1, 0.21) ranks second behind i2; a1 -> i2 at rank 1.
    assert values["a2i_recall_at_1"] == pytest.approx(0.5)
    assert values["a2i_recall_at_2"] == pytest.approx(1.0)
    # Direct i->a: i0 -> a0 (0.1) vs a1 (0.0): a0 first, hit; i1 -> a0 (0.09+0.1) vs a1 (0.1): hit;
    # i2 -> a1 (0.98) vs a0 (0.99): miss at 1, hit at 2.
    a0, a1 = sounds
    for i, want_first in ((0, True), (1, True), (2, False)):
        correct = a0 if img_labels[i] == "x" else a1
        wrong = a1 if img_labels[i] == "x" else a0
        assert (images[i] @ correct > images[i] @ wrong) == want_first
    assert values["i2a_recall_at_1"] == pytest.approx(2 / 3)
    assert values["i2a_recall_at_2"] == pytest.approx(1.0)
    # Two-step a->i: a0 . a_bank = [0.29, 0.05]: the "x" caption, which queries the images: i1 first
    # (hit). a1 -> a_bank [0.19.., 0.196..]: the third-axis caption, whose
    # scores are 0 for every image: all tie, so its rank is pessimistic (3 at worst) -> miss at 1 and 2.
    assert nearest_rows(sounds, a_bank).tolist() == [0, 1]
    assert values["twostep_a2i_recall_at_1"] == pytest.approx(0.5)
    assert values["twostep_a2i_recall_at_2"] == pytest.approx(0.5)
    # Two-step i->a: i0, i1 -> caption "x" axis -> scores a0 0.1, a1 0: a0 first, hit. i2 -> caption
    # "y" axis -> a1 0.98 vs a0 0.99: miss at 1.
    assert values["twostep_i2a_recall_at_1"] == pytest.approx(2 / 3)
    # Chance: a->i, a0 has 2 correct of 3 images, a1 one of 3.
    assert values["chance_a2i_recall_at_1"] == pytest.approx(
        (chance_recall(3, 1, 2) + chance_recall(3, 1, 1)) / 2
    )
    assert values["chance_i2a_recall_at_1"] == pytest.approx(0.5)
    assert values["concepts"] == 2 and values["audio_items"] == 2 and values["image_items"] == 3
    assert results["direct"].n_t2i_queries == 2

    table = emergent_table_markdown({k: (v, 0.01) for k, v in values.items()}, ("audio", "image"))
    assert "| direct, shared space | 50.0 ± 1.0 |" in table
    assert "a2i R@1" in table and "i2a R@2" in table
