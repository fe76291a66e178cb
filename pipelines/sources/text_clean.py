"""Caption cleaning and a caption quality heuristic for the image-text sources.

Package metadata names things for programmers (`arrow-big-down-line`, `siringa_architetto_01`,
`HomeOutline`); these helpers turn such names and noisy clip-art titles into plain English
phrases, and score how caption-like a text is (for the data-quality ablation).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from pathlib import Path

_TAG_RE = re.compile(r"<[^>]+>")
_URL_RE = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
_CAMEL_RE = re.compile(r"(?<=[a-z])(?=[A-Z])")
_SEP_RE = re.compile(r"[_\-./\\|+]+")
_WORD_RE = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
# Trailing export counters and ids ("_01", " 2", "-v3") carry no meaning for a caption.
_TRAILING_ID_RE = re.compile(r"(\s+(v?\d+[a-z]?|(?=[a-f]*\d)[0-9a-f]{6,}))+$", re.IGNORECASE)


def name_to_words(name: str) -> str:
    """`arrow-big-down_line` / `HomeOutline` -> `arrow big down line` / `home outline`."""
    text = _CAMEL_RE.sub(" ", name)
    text = _SEP_RE.sub(" ", text)
    return " ".join(text.lower().split())


def clean_caption(raw: str) -> str:
    """Plain-text, single-line, lower-case version of a noisy title or description.

    Removes markup, entities, URLs, file-name separators and trailing counters; keeps words,
    digits and light punctuation. Returns "" when nothing readable is left.
    """
    text = html.unescape(_TAG_RE.sub(" ", raw))
    text = _URL_RE.sub(" ", text)
    text = re.sub(r"\.(svg|png|jpe?g|gif|ai|eps)\b", " ", text, flags=re.IGNORECASE)
    text = _CAMEL_RE.sub(" ", text)
    text = _SEP_RE.sub(" ", text)
    text = re.sub(r"[^\w\s,;:!?'()&]", " ", text)
    text = " ".join(text.lower().split())
    text = _TRAILING_ID_RE.sub("", text)
    return text.strip(" ,;:")


def article(phrase: str) -> str:
    """`a` or `an` for a phrase (by its first letter; good enough for captions)."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def join_terms(terms: Iterable[str], exclude: str = "", max_terms: int = 6) -> list[str]:
    """Distinct cleaned terms in order, without those already contained in `exclude`, at most max_terms."""
    seen: set[str] = set()
    excluded = set(re.findall(r"\w+", exclude.lower()))
    out: list[str] = []
    for term in terms:
        t = clean_caption(str(term))
        if not t or t in seen or t in excluded or t == exclude.lower():
            continue
        seen.add(t)
        out.append(t)
        if len(out) >= max_terms:
            break
    return out


def load_vocabulary(path: Path) -> frozenset[str]:
    """Lower-case words of a one-word-per-line dictionary (e.g. Debian's /usr/share/dict files)."""
    words = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        w = line.strip().lower()
        if w.endswith("'s"):
            w = w[:-2]
        if w.isalpha():
            words.add(w)
    if not words:
        raise ValueError(f"{path} holds no words")
    return frozenset(words)


def quality_score(text: str, vocabulary: frozenset[str]) -> float:
    """A caption-likeness score in [0, 1]: dictionary-word fraction times a length sanity factor.

    Words of one letter are ignored (they are in every dictionary). Length factor: 0 words -> 0,
    1 word -> 0.5, 2..25 words -> 1, then decaying as 25/n for rambling descriptions.
    """
    words = [w.lower() for w in _WORD_RE.findall(text)]
    words = [w[:-2] if w.endswith("'s") else w for w in words if len(w) > 1]
    if not words:
        return 0.0
    known = sum(1 for w in words if w in vocabulary or _stem_known(w, vocabulary))
    n = len(words)
    length_factor = 0.5 if n == 1 else (1.0 if n <= 25 else 25.0 / n)
    return round(known / n * length_factor, 4)


def _stem_known(word: str, vocabulary: frozenset[str]) -> bool:
    # Dictionaries list base forms; accept simple inflections of a known word.
    for suffix in ("s", "es", "ed", "ing", "ly"):
        if word.endswith(suffix) and word[: -len(suffix)] in vocabulary:
            return True
    return False
