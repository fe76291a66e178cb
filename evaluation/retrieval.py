"""Cross-modal retrieval metrics over positive pairs (the CLIP_benchmark / LAVIS protocol, multi-match).

One set of UNIQUE items (images, audio clips, ...) ``item_emb [N_items, d]``, one set of UNIQUE texts
``text_emb [N_texts, d]``, and the positive pairs ``(pair_items[p], pair_texts[p])`` between them. A
text may describe several items (the name of an emoji drawn in six styles) and an item may have
several captions. Two directions:

- text->item (``t2i``): every text in some pair is a query; the candidates are all items, including
  items that are in no pair (they stay in as distractors). A query is a hit at K when ANY item paired
  with it is in the top K; its rank is the best rank among those items.
- item->text (``i2t``): likewise, every item in some pair is a query over all texts.

One caption per item is the special case ``pair_items = text_to_item``, ``pair_texts = arange(N_texts)``.
Duplicated pairs count once. Duplicated texts (or items) should be merged by the caller first
(`paired_ids` does): identical candidates tie, and ties count against the query.

Scores are dot products (cosine similarities when the embeddings are L2-normalised, which the caller
does or asks for with ``normalize=True``). Ranks are 1-based.

Ties are broken against the query: the rank of a query is 1 + the number of INCORRECT candidates whose
score is >= the score of its best correct candidate (the pessimistic choice). The optimistic choice
(count only strictly greater scores) would give a collapsed model, whose embeddings are all equal, a
perfect Recall@1; the pessimistic one gives it the worst rank.

``retrieval_metrics`` computes this in chunks of queries: one matmul per chunk gives the similarity
block [chunk, N_candidates], from which only the correct candidates' scores and a count of the
candidates scoring at least as high are kept. Neither the full N x N matrix nor a sort is ever made,
so 100k x 100k needs about 100 MB (one 256 x 100k float32 block, the default chunk of 256 queries)
plus a few MB for counting in column slices. ``candidate_chunk_size`` also splits the candidate axis
(two passes: first the best correct score, then the counts; each block is recomputed, so twice the
matmul work) for candidate sets too large for one block. ``naive_retrieval`` is the full-matrix
argsort reference the tests compare it with.

Hubness (a few candidates that are the nearest neighbour of many queries) can be corrected as an
evaluation option, ``hubness="csls"`` or ``"inverted_softmax"``: the chunked loop then ranks by an
adjusted score, computed in place in each block from the dot products and per-row / per-column terms
that one chunked pass per side computes first (see `retrieval_metrics`). The default (None) ranks by
the dot products themselves.

Per-group galleries (`retrieval_by_group`): the same metrics with one group of items at a time (an image
source such as "twemoji" or "noto") as the gallery, so that a style that is easy to tell apart from the
others does not make retrieval look easier than it is; `mean_over_groups` and
`chance_levels_by_group` / `mean_chance_over_groups` average them with equal weights.

Also here: `PairedSplit` and `paired_ids` (one split's unique ids, latents and pairs), `chance_levels`
(Recall@K of a random ranking for the same pairs), `evaluate_model` (embed a split with a model's
two sides and score it) and `evaluate_model_by_group` (the same, pooled and per group).

Run the benchmark with ``python -m benchmarks.bench_retrieval``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
DEFAULT_CHUNK_SIZE = 256
HUBNESS_METHODS: tuple[str, ...] = ("csls", "inverted_softmax")
DEFAULT_HUBNESS_K = 10  # CSLS neighbourhood size (Conneau et al. 2018)
DEFAULT_HUBNESS_BETA = 30.0  # inverse temperature of the inverted softmax (Smith et al. 2017)
# Elements per comparison slice when counting (1 MB of mask, 4 MB once summed as int32).
_COUNT_SLICE = 2**20

ArrayLike = np.ndarray | torch.Tensor
IndexLike = np.ndarray | torch.Tensor | Sequence[int]


@dataclass(frozen=True)
class RetrievalResult:
    """Retrieval metrics in both directions; recalls are fractions in [0, 1], ranks are 1-based.

    ``t2i_ranks`` [n_t2i_queries] is the best rank of the items paired with each text listed in
    ``t2i_query_texts``; ``i2t_ranks`` [n_i2t_queries] the best rank of the texts paired with each item
    listed in ``i2t_query_items`` (queries in ascending index order; unpaired rows are not queries).
    """

    ks: tuple[int, ...]
    t2i_recall: dict[int, float]
    i2t_recall: dict[int, float]
    t2i_mean_rank: float
    t2i_median_rank: float
    i2t_mean_rank: float
    i2t_median_rank: float
    n_items: int
    n_texts: int
    n_t2i_queries: int
    n_i2t_queries: int
    t2i_ranks: np.ndarray = field(repr=False, compare=False)
    i2t_ranks: np.ndarray = field(repr=False, compare=False)
    t2i_query_texts: np.ndarray = field(repr=False, compare=False)
    i2t_query_items: np.ndarray = field(repr=False, compare=False)

    def as_dict(self, prefix: str = "", directions: tuple[str, str] = ("t2i", "i2t")) -> dict[str, float]:
        """Flat metric names without '@', e.g. ``t2i_recall_at_1``, ``i2t_median_rank``.

        `prefix` is prepended as given (``"test_"`` -> ``test_t2i_recall_at_1``); `directions` renames
        the two directions for a caller that knows the modality (``("t2a", "a2t")``).
        """
        if len(directions) != 2 or not all(isinstance(d, str) and d for d in directions):
            raise ValueError(f"directions must be two non-empty names, got {directions!r}")
        t2i, i2t = directions
        out: dict[str, float] = {}
        for name, recall in ((t2i, self.t2i_recall), (i2t, self.i2t_recall)):
            for k in self.ks:
                out[f"{prefix}{name}_recall_at_{k}"] = recall[k]
        out[f"{prefix}{t2i}_mean_rank"] = self.t2i_mean_rank
        out[f"{prefix}{t2i}_median_rank"] = self.t2i_median_rank
        out[f"{prefix}{i2t}_mean_rank"] = self.i2t_mean_rank
        out[f"{prefix}{i2t}_median_rank"] = self.i2t_median_rank
        return out


# ----------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True, eq=False)
class PairedSplit:
    """One split ready for retrieval: unique items and texts with their raw latents, and the pairs.

    item_ids [n_items] and text_ids [n_texts] name the rows of items [n_items, d_m] and texts
    [n_texts, d_t] (each side in its own encoder's space, before the adapters); pair_items and
    pair_texts, int64 [P], list the positive pairs as indices into them. Build the ids and pairs with
    `paired_ids`. The shapes and indices are checked on construction (ValueError).
    """

    item_ids: list[str]
    text_ids: list[str]
    items: np.ndarray
    texts: np.ndarray
    pair_items: np.ndarray
    pair_texts: np.ndarray

    def __post_init__(self) -> None:
        for name, ids, rows in (("item", self.item_ids, self.items), ("text", self.text_ids, self.texts)):
            if np.ndim(rows) != 2 or len(rows) != len(ids):
                raise ValueError(
                    f"{name}s must be [{len(ids)}, d] (one row per {name} id), got shape {np.shape(rows)}"
                )
        pi = _as_index_vector("pair_items", self.pair_items)
        pt = _as_index_vector("pair_texts", self.pair_texts)
        _check_pairs(pi, pt, len(self.item_ids), len(self.text_ids), allow_empty=True)


def paired_ids(
    media_ids: Sequence[str], caption_ids: Sequence[str]
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Unique ids and the distinct pairs of row-aligned (media id, caption id) pairs.

    Returns (item_ids, text_ids, pair_items, pair_texts): the unique media and caption ids in
    first-seen order, and each distinct pair once as int64 indices into them, sorted by (item, text).
    A caption shared by several items is then one query with several correct items, not several
    identical queries that tie with each other.
    """
    if len(media_ids) != len(caption_ids):
        raise ValueError(
            f"media_ids and caption_ids must be row-aligned, got {len(media_ids)} and {len(caption_ids)}"
        )
    items, texts = list(dict.fromkeys(media_ids)), list(dict.fromkeys(caption_ids))
    ipos, tpos = {m: i for i, m in enumerate(items)}, {c: i for i, c in enumerate(texts)}
    pairs = sorted({(ipos[m], tpos[c]) for m, c in zip(media_ids, caption_ids, strict=True)})
    return (
        items,
        texts,
        np.array([p[0] for p in pairs], dtype=np.int64),
        np.array([p[1] for p in pairs], dtype=np.int64),
    )


# ----------------------------------------------------------------------------------------------- chance


def chance_recall(n_candidates: int, k: int, n_correct: int = 1) -> float:
    """Expected Recall@k of a uniformly random ranking of `n_candidates` with `n_correct` correct ones.

    With one correct candidate this is min(k, n) / n; with m (a hit is any correct one in the top k)
    it is 1 - C(n - m, k) / C(n, k).
    """
    for name, value, low in (("n_candidates", n_candidates, 1), ("k", k, 1), ("n_correct", n_correct, 1)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if n_correct > n_candidates:
        raise ValueError(f"n_correct ({n_correct}) exceeds n_candidates ({n_candidates})")
    if k > n_candidates - n_correct:
        return 1.0
    # P(no correct one in the top k) as a running product: the binomials overflow floats at 100k.
    miss = 1.0
    for i in range(k):
        miss *= (n_candidates - n_correct - i) / (n_candidates - i)
    return 1.0 - miss


def chance_levels(
    pair_items: IndexLike,
    pair_texts: IndexLike,
    n_items: int,
    n_texts: int,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, dict[int, float]]:
    """Expected Recall@K of a random ranking for the queries `retrieval_metrics` scores on these pairs.

    Per direction, the mean over its queries of `chance_recall` (a query with m correct candidates
    among n has chance 1 - C(n - m, K) / C(n, K)): text->item over the n_items items, item->text over
    the n_texts texts. Returns ``{"t2i": {K: p}, "i2t": {K: p}}`` with K ascending; duplicated pairs
    count once. Raises ValueError on bad sizes, pairs or ks.
    """
    ks_t = _check_ks(ks)
    for name, value in (("n_items", n_items), ("n_texts", n_texts)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    n_items, n_texts = int(n_items), int(n_texts)
    pi = _as_index_vector("pair_items", pair_items)
    pt = _as_index_vector("pair_texts", pair_texts)
    _check_pairs(pi, pt, n_items, n_texts)
    keys = torch.unique(pi * n_texts + pt)
    pi_u, pt_u = (keys // n_texts).numpy(), (keys % n_texts).numpy()
    per_text = np.bincount(pt_u, minlength=n_texts)
    per_item = np.bincount(pi_u, minlength=n_items)
    out: dict[str, dict[int, float]] = {}
    for name, counts, n in (("t2i", per_text, n_items), ("i2t", per_item, n_texts)):
        # One chance_recall per distinct m, then the mean over the queries' values in query order.
        m_values, which = np.unique(counts[counts > 0], return_inverse=True)
        out[name] = {}
        for k in ks_t:
            per_m = np.array([chance_recall(n, min(k, n), int(m)) for m in m_values], dtype=np.float64)
            out[name][k] = float(np.mean(per_m[which]))
    return out


# ----------------------------------------------------------------------------------------------- metrics


def retrieval_metrics(
    item_emb: ArrayLike,
    text_emb: ArrayLike,
    pair_items: IndexLike,
    pair_texts: IndexLike,
    *,
    ks: Iterable[int] = DEFAULT_KS,
    normalize: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    candidate_chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    hubness: str | None = None,
    hubness_k: int = DEFAULT_HUBNESS_K,
    hubness_beta: float = DEFAULT_HUBNESS_BETA,
) -> RetrievalResult:
    """Recall@K, mean and median rank in both directions, computed in chunks of queries.

    item_emb: float [N_items, d]; text_emb: float [N_texts, d] (numpy arrays or torch tensors);
    pair_items, pair_texts: int [P], the positive pairs as row indices (a text is a hit at K when any
    item paired with it is in the top K, and vice versa). Computation is float32 in torch on `device`
    (default: item_emb's device, CPU for numpy). `normalize` L2-normalises copies of both inputs first
    (a zero row is an error). `chunk_size` queries are scored per matmul; `candidate_chunk_size` (None:
    all candidates at once) bounds the candidate axis too, at the cost of computing each block twice;
    neither changes the result. `progress`: tqdm bars (None: only on a terminal).

    `hubness` ranks by a hubness-corrected score instead of the dot product s(q, c) (cosine when
    normalised); the statistics are taken over ALL rows of the other set, paired or not:

    - ``"csls"`` (Conneau et al. 2018): 2 s(t, i) - r_i - r_t, where r_i is the mean of item i's
      `hubness_k` highest scores against the texts and r_t the mean of text t's `hubness_k` highest
      scores against the items (k is capped at the size of the other set). The score is symmetric,
      so both directions rank by the same matrix; a hub (high r_c) is pushed down every query's list.
      r_q is constant within a query's list and does not change its ranks, but it is kept.
    - ``"inverted_softmax"`` (Smith et al. 2017): each candidate's column is normalised by a softmax
      over the queries at inverse temperature `hubness_beta`, P(c | q) = exp(b s(q, c)) /
      sum_q' exp(b s(q', c)); text->item normalises each item over all texts, item->text each text
      over all items. It is ranked as its logarithm, b s(q, c) - logsumexp_q' b s(q', c).

    The per-row terms come from one chunked pass over each side first (the same chunk sizes; a running
    top-k, or a logsumexp from the exact maximum and a float64 sum of exponentials, so the candidate
    chunking changes them by float64 rounding at most), and each block of
    the ranking loop is adjusted in place, so memory stays as without correction; the time grows by
    those passes and their top-k or exponentials (2.5x for CSLS, 4x for the inverted softmax on CPU at
    8k x 8k). The corrected scores are float32 like the dot products: candidates whose corrected scores
    differ by less than float32 resolves at their size (about 1e-7 * beta for the inverted softmax's
    log-probabilities, which a large beta packs together) tie, against the query. None (the default)
    ranks by the dot products themselves, as before.

    Raises ValueError on mismatched or empty shapes, non-finite values, no pairs, pair indices that are
    not integers or out of range, and bad ks, chunk sizes or hubness options.
    """
    ks_t = _check_ks(ks)
    _check_chunk("chunk_size", chunk_size)
    if candidate_chunk_size is not None:
        _check_chunk("candidate_chunk_size", candidate_chunk_size)
    _check_hubness(hubness, hubness_k, hubness_beta)
    if device is None:
        device = item_emb.device if isinstance(item_emb, torch.Tensor) else torch.device("cpu")
    items, texts, pi, pt = _prepare(
        item_emb, text_emb, pair_items, pair_texts, normalize, torch.device(device)
    )
    n_items, n_texts = items.shape[0], texts.shape[0]
    t_rows, t_ptr, t_cols = _csr(pt, pi, n_texts, n_items)
    i_rows, i_ptr, i_cols = _csr(pi, pt, n_items, n_texts)
    with torch.no_grad():
        t2i_adjust, i2t_adjust = _hubness_adjustments(
            items, texts, hubness, hubness_k, hubness_beta, chunk_size, candidate_chunk_size, progress
        )
        t2i_ranks = _chunked_ranks(
            texts,
            items,
            t_ptr,
            t_cols,
            None if t_rows.numel() == n_texts else t_rows,
            chunk_size,
            candidate_chunk_size,
            progress,
            "text->item ranks",
            t2i_adjust,
        )
        i2t_ranks = _chunked_ranks(
            items,
            texts,
            i_ptr,
            i_cols,
            None if i_rows.numel() == n_items else i_rows,
            chunk_size,
            candidate_chunk_size,
            progress,
            "item->text ranks",
            i2t_adjust,
        )
    return _result(
        ks_t, t2i_ranks.numpy(), i2t_ranks.numpy(), t_rows.numpy(), i_rows.numpy(), n_items, n_texts
    )


def naive_retrieval(
    item_emb: ArrayLike,
    text_emb: ArrayLike,
    pair_items: IndexLike,
    pair_texts: IndexLike,
    *,
    ks: Iterable[int] = DEFAULT_KS,
    normalize: bool = False,
    hubness: str | None = None,
    hubness_k: int = DEFAULT_HUBNESS_K,
    hubness_beta: float = DEFAULT_HUBNESS_BETA,
) -> RetrievalResult:
    """Reference: the full [N_texts, N_items] float64 score matrix, each row sorted with numpy.

    Same inputs, tie rule, hubness options and validation as `retrieval_metrics`; O(N_texts * N_items)
    memory, so for tests and small sets only. Each query's row is sorted by descending score with
    incorrect candidates before correct ones among equal scores, and the rank is the position of the
    first correct one. The hubness corrections are applied to the whole matrix as their papers write
    them (CSLS from fully sorted rows and columns, the inverted softmax as the normalised
    probabilities themselves).
    """
    ks_t = _check_ks(ks)
    _check_hubness(hubness, hubness_k, hubness_beta)
    items_t, texts_t, pi, pt = _prepare(
        item_emb, text_emb, pair_items, pair_texts, normalize, torch.device("cpu")
    )
    items = items_t.numpy().astype(np.float64)
    texts = texts_t.numpy().astype(np.float64)
    scores = texts @ items.T  # [N_texts, N_items]
    t2i_scores, i2t_scores = scores, scores.T
    if hubness == "csls":

        def knn_mean(s: np.ndarray) -> np.ndarray:
            """Per row of s: the mean of its min(k, n) highest entries."""
            k = min(hubness_k, s.shape[1])
            return np.sort(s, axis=1)[:, ::-1][:, :k].mean(axis=1)

        r_texts, r_items = knn_mean(scores), knn_mean(scores.T)
        t2i_scores = 2.0 * scores - r_texts[:, None] - r_items[None, :]
        i2t_scores = t2i_scores.T
    elif hubness == "inverted_softmax":

        def column_softmax(s: np.ndarray) -> np.ndarray:
            """Each column of s [queries, candidates] as a softmax over the queries."""
            e = np.exp(hubness_beta * (s - s.max(axis=0, keepdims=True)))
            return e / e.sum(axis=0, keepdims=True)

        t2i_scores, i2t_scores = column_softmax(scores), column_softmax(scores.T)
    correct = np.zeros(scores.shape, dtype=bool)
    correct[pt.numpy(), pi.numpy()] = True

    def first_correct_rank(s: np.ndarray, c: np.ndarray) -> np.ndarray:
        # lexsort's last key is the primary one: descending score, then incorrect (0) before correct (1).
        order = np.lexsort((c.astype(np.int8), -s), axis=-1)
        return np.argmax(np.take_along_axis(c, order, axis=-1), axis=-1).astype(np.int64) + 1

    query_texts = np.flatnonzero(correct.any(axis=1))
    query_items = np.flatnonzero(correct.any(axis=0))
    t2i_ranks = first_correct_rank(t2i_scores[query_texts], correct[query_texts])
    i2t_ranks = first_correct_rank(i2t_scores[query_items], correct.T[query_items])
    return _result(ks_t, t2i_ranks, i2t_ranks, query_texts, query_items, items.shape[0], texts.shape[0])


def evaluate_model(
    model: Any, split: PairedSplit, progress: bool | None = False, **options: Any
) -> tuple[RetrievalResult, np.ndarray, np.ndarray]:
    """Embed a split with a model's two sides and score retrieval on its pairs.

    `model` needs ``sides`` (the media side first, then the text side, as a fusion.adapters.FusedModel
    has them) and ``embed(side, latents [B, d_side]) -> [B, d]`` returning a torch tensor or a numpy
    array (a baseline without adapters can return its input). `options` go to `retrieval_metrics`
    (``hubness=``, chunk sizes, ...). Returns (`retrieval_metrics` of the embeddings on split's pairs,
    item embeddings [n_items, d], text embeddings [n_texts, d]) as numpy.
    """
    item_emb, text_emb = _embed(model, split)
    result = retrieval_metrics(
        item_emb, text_emb, split.pair_items, split.pair_texts, progress=progress, **options
    )
    return result, item_emb, text_emb


def evaluate_model_by_group(
    model: Any,
    split: PairedSplit,
    item_groups: Sequence[str],
    progress: bool | None = False,
    **options: Any,
) -> tuple[RetrievalResult, dict[str, RetrievalResult], np.ndarray, np.ndarray]:
    """`evaluate_model` plus `retrieval_by_group`, from one embedding of the split.

    `item_groups`: one group name per item of the split (aligned with ``split.item_ids``). `options`
    go to both scorings. Returns (pooled result, {group: result}, item embeddings, text embeddings).
    """
    item_emb, text_emb = _embed(model, split)
    pooled = retrieval_metrics(
        item_emb, text_emb, split.pair_items, split.pair_texts, progress=progress, **options
    )
    by_group = retrieval_by_group(
        item_emb, text_emb, split.pair_items, split.pair_texts, item_groups, progress=progress, **options
    )
    return pooled, by_group, item_emb, text_emb


def _embed(model: Any, split: PairedSplit) -> tuple[np.ndarray, np.ndarray]:
    media_side, text_side = model.sides
    return _to_numpy(model.embed(media_side, split.items)), _to_numpy(model.embed(text_side, split.texts))


# ----------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class _GroupSubset:
    """One group's gallery: its items and the texts paired with them (sorted global row indices), and
    its pairs as local indices into those."""

    items: np.ndarray
    texts: np.ndarray
    pair_items: np.ndarray
    pair_texts: np.ndarray


def _group_names(item_groups: object, n_items: int | None = None) -> list[str]:
    """item_groups as a list of names, checked: one string per item."""
    if isinstance(item_groups, str) or not isinstance(item_groups, Sequence | np.ndarray):
        raise ValueError(f"item_groups must be a sequence of group names, got {type(item_groups).__name__}")
    names = list(item_groups)
    if n_items is not None and len(names) != n_items:
        raise ValueError(f"item_groups has {len(names)} entries for {n_items} items (one per item)")
    for i, g in enumerate(names):
        if not isinstance(g, str):
            raise ValueError(f"item_groups[{i}] must be a group name (str), got {g!r}")
    return names


def _group_subsets(pi: torch.Tensor, pt: torch.Tensor, names: list[str]) -> dict[str, _GroupSubset]:
    """The scorable groups (>= 2 items, >= 1 pair) of items named by `names` [N_items], in sorted
    order; pairs are checked by the caller."""
    n_items = len(names)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(names):
        members.setdefault(g, []).append(i)
    pi_np, pt_np = pi.numpy(), pt.numpy()
    out: dict[str, _GroupSubset] = {}
    for name in sorted(members):
        rows = np.array(members[name], dtype=np.int64)
        if rows.size < 2:
            continue
        inside = np.zeros(n_items, dtype=bool)
        inside[rows] = True
        keep = inside[pi_np]
        if not keep.any():
            continue
        texts = np.unique(pt_np[keep])
        out[name] = _GroupSubset(
            rows, texts, np.searchsorted(rows, pi_np[keep]), np.searchsorted(texts, pt_np[keep])
        )
    return out


def retrieval_by_group(
    item_emb: ArrayLike,
    text_emb: ArrayLike,
    pair_items: IndexLike,
    pair_texts: IndexLike,
    item_groups: Sequence[str],
    *,
    ks: Iterable[int] = DEFAULT_KS,
    normalize: bool = False,
    **options: Any,
) -> dict[str, RetrievalResult]:
    """`retrieval_metrics` with one group of items at a time as the gallery: {group: result}.

    item_groups [N_items]: the group name of each item (e.g. its image source, "twemoji" or "noto").
    For group g the gallery is g's items (the unpaired ones stay in as distractors), the text queries
    are the texts paired with them, and the candidate texts of item->text are those same texts; only the
    pairs between them count. A text shared with another group's items is a query in both groups, each
    time with that group's items alone. Groups with fewer than 2 items (no ranking to speak of), and
    groups whose items are in no pair, are SKIPPED: they are not in the result. Groups come in sorted
    order. Everything else (`ks`, `normalize`, and `options`: chunk sizes, device, progress, hubness,
    whose statistics are then taken within the group) is as in `retrieval_metrics`, which each group's
    result equals on the group's sub-arrays, except that ``t2i_query_texts`` and ``i2t_query_items``
    are mapped back to rows of text_emb and item_emb (n_items and n_texts are the group's sizes).

    Raises ValueError as `retrieval_metrics`, and when item_groups is not one string per item.
    """
    ks_t = _check_ks(ks)
    device = options.pop("device", None)
    if device is None:
        device = item_emb.device if isinstance(item_emb, torch.Tensor) else torch.device("cpu")
    items, texts, pi, pt = _prepare(
        item_emb, text_emb, pair_items, pair_texts, normalize, torch.device(device)
    )
    out: dict[str, RetrievalResult] = {}
    names = _group_names(item_groups, items.shape[0])
    for name, g in _group_subsets(pi, pt, names).items():
        sub_items = items[torch.from_numpy(g.items).to(items.device)]
        sub_texts = texts[torch.from_numpy(g.texts).to(texts.device)]
        result = retrieval_metrics(
            sub_items, sub_texts, g.pair_items, g.pair_texts, ks=ks_t, device=device, **options
        )
        out[name] = replace(
            result,
            t2i_query_texts=g.texts[result.t2i_query_texts],
            i2t_query_items=g.items[result.i2t_query_items],
        )
    return out


def chance_levels_by_group(
    pair_items: IndexLike,
    pair_texts: IndexLike,
    item_groups: Sequence[str],
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, dict[str, dict[int, float]]]:
    """`chance_levels` of each group's gallery, as `retrieval_by_group` forms and skips them.

    item_groups [N_items]: one group name per item (their number is the number of items). Returns
    {group: {"t2i": {K: p}, "i2t": {K: p}}} in sorted group order.
    """
    ks_t = _check_ks(ks)
    pi = _as_index_vector("pair_items", pair_items)
    pt = _as_index_vector("pair_texts", pair_texts)
    names = _group_names(item_groups)
    _check_pairs(pi, pt, len(names), int(pt.max()) + 1 if pt.numel() else 1)
    return {
        name: chance_levels(g.pair_items, g.pair_texts, g.items.size, g.texts.size, ks_t)
        for name, g in _group_subsets(pi, pt, names).items()
    }


def mean_over_groups(
    results: Mapping[str, RetrievalResult], prefix: str = "", directions: tuple[str, str] = ("t2i", "i2t")
) -> dict[str, float]:
    """The mean over groups, each weighted equally, of every metric of `retrieval_by_group`'s results.

    Flat names as ``RetrievalResult.as_dict(prefix, directions)`` writes them. A small group counts as
    much as a large one (the mean over galleries, not over queries). Raises ValueError on no groups or
    results with different ks.
    """
    if not results:
        raise ValueError("no group results to average (every group may have been skipped)")
    flat = {name: r.as_dict(prefix, directions) for name, r in results.items()}
    first_name, first = next(iter(flat.items()))
    for name, d in flat.items():
        if d.keys() != first.keys():
            raise ValueError(f"groups {first_name!r} and {name!r} were scored with different ks")
    return {m: float(np.mean([d[m] for d in flat.values()])) for m in first}


def mean_chance_over_groups(
    chances: Mapping[str, Mapping[str, Mapping[int, float]]],
) -> dict[str, dict[int, float]]:
    """`chance_levels_by_group`'s levels averaged over groups with equal weights, as `mean_over_groups`
    averages the results: {"t2i": {K: p}, "i2t": {K: p}}. Raises ValueError on no groups or differing
    directions or ks."""
    if not chances:
        raise ValueError("no group chance levels to average (every group may have been skipped)")
    first_name, first = next(iter(chances.items()))
    shape = {d: tuple(levels) for d, levels in first.items()}
    for name, c in chances.items():
        if {d: tuple(levels) for d, levels in c.items()} != shape:
            raise ValueError(f"groups {first_name!r} and {name!r} have different directions or ks")
    return {
        d: {k: float(np.mean([c[d][k] for c in chances.values()])) for k in ks} for d, ks in shape.items()
    }


def _chunked_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    ptr: torch.Tensor,
    cols: torch.Tensor,
    query_rows: torch.Tensor | None,
    chunk_size: int,
    candidate_chunk_size: int | None,
    progress: bool | None,
    desc: str,
    adjust: _Adjust | None = None,
) -> torch.Tensor:
    """Best-correct rank of each query.

    queries [M, d], candidates [C, d] float32 on one device; query_rows int64 [Q] (CPU) picks the query
    rows of `queries` (None: all M, Q = M); ptr [Q + 1] and cols [P] int64 (CPU) list the correct
    candidates of each query in CSR form, at least one per query. `adjust` (a hubness correction)
    turns every block of dot products s into scale * s - query_bias - candidate_bias in place, before
    anything is read from it. Returns int64 [Q] (CPU).
    """
    dev = queries.device
    n_q = queries.shape[0] if query_rows is None else query_rows.shape[0]
    n_c = candidates.shape[0]
    step_c = n_c if candidate_chunk_size is None else min(candidate_chunk_size, n_c)
    blocks = [(cs, min(cs + step_c, n_c)) for cs in range(0, n_c, step_c)]
    ranks = torch.empty(n_q, dtype=torch.int64)
    # One score buffer and one mask buffer for the whole loop: a fresh 100 MB block per chunk costs
    # page faults comparable to the comparison itself, and `out=` keeps the peak at these two.
    width = min(chunk_size, n_q) * step_c
    sim_buf = torch.empty(width, dtype=torch.float32, device=dev)
    mask_buf = torch.empty(min(width, max(_COUNT_SLICE, min(chunk_size, n_q))), dtype=torch.bool, device=dev)

    def block(q: torch.Tensor, q_bias: torch.Tensor | None, cs: int, ce: int) -> torch.Tensor:
        """Scores [B, ce - cs] of the chunk's queries q [B, d] against candidates cs:ce."""
        out = sim_buf[: q.shape[0] * (ce - cs)].view(q.shape[0], ce - cs)
        torch.mm(q, candidates[cs:ce].T, out=out)
        if adjust is not None:
            if adjust.scale != 1.0:
                out.mul_(adjust.scale)
            if q_bias is not None:
                out.sub_(q_bias[:, None])
            out.sub_(adjust.candidate_bias[None, cs:ce])
        return out

    disable = None if progress is None else not progress
    for s in tqdm(range(0, n_q, chunk_size), desc=desc, unit="chunk", disable=disable, leave=False):
        e = min(s + chunk_size, n_q)
        # Gathering the query rows per chunk keeps a subset of the items from being copied whole.
        q = queries[s:e] if query_rows is None else queries[query_rows[s:e].to(dev)]
        q_bias = None
        if adjust is not None and adjust.query_bias is not None:
            qb = adjust.query_bias
            q_bias = qb[s:e] if query_rows is None else qb[query_rows[s:e].to(dev)]
        p0, p1 = int(ptr[s]), int(ptr[e])
        rows = torch.repeat_interleave(torch.arange(e - s), ptr[s + 1 : e + 1] - ptr[s:e]).to(dev)
        pcols = cols[p0:p1].to(dev)
        vals = torch.empty(p1 - p0, dtype=torch.float32, device=dev)

        # Pass 1: the score of every correct pair, read from the same matmul block that the counts use,
        # so that a candidate identical to the correct one ties exactly instead of by rounding luck.
        sim = None
        for cs, ce in blocks:
            sim = block(q, q_bias, cs, ce)
            inside = (pcols >= cs) & (pcols < ce)
            vals[inside] = sim[rows[inside], pcols[inside] - cs]
        best = torch.full((e - s,), -math.inf, dtype=torch.float32, device=dev)
        best.scatter_reduce_(0, rows, vals, reduce="amax")

        # Pass 2: how many candidates score at least the best correct score; the correct ones among them
        # are taken off again, so that what remains is the pessimistic count of incorrect ones.
        at_least = torch.zeros(e - s, dtype=torch.int64, device=dev)
        for cs, ce in blocks:
            if len(blocks) > 1:
                sim = block(q, q_bias, cs, ce)
            # Column slices: sum() casts the boolean mask to an integer copy, which over the whole block
            # would be as large as the block itself. int32 because counts stay below 2**31.
            n_rows, n_cols = sim.shape
            step = max(1, _COUNT_SLICE // n_rows)
            for a in range(0, n_cols, step):
                b = min(a + step, n_cols)
                mask = mask_buf[: n_rows * (b - a)].view(n_rows, b - a)
                torch.ge(sim[:, a:b], best[:, None], out=mask)
                at_least += mask.sum(dim=1, dtype=torch.int32)
        correct_at_least = torch.zeros(e - s, dtype=torch.int64, device=dev)
        correct_at_least.index_add_(0, rows, (vals >= best[rows]).to(torch.int64))
        ranks[s:e] = (at_least - correct_at_least + 1).cpu()
    return ranks


@dataclass(frozen=True)
class _Adjust:
    """A hubness correction of one direction: score = scale * s - query_bias[q] - candidate_bias[c].

    query_bias [M] (one per row of the query matrix, None: no query term), candidate_bias [C]: float32
    on the embeddings' device.
    """

    scale: float
    query_bias: torch.Tensor | None
    candidate_bias: torch.Tensor


def _hubness_adjustments(
    items: torch.Tensor,
    texts: torch.Tensor,
    hubness: str | None,
    k: int,
    beta: float,
    chunk_size: int,
    candidate_chunk_size: int | None,
    progress: bool | None,
) -> tuple[_Adjust | None, _Adjust | None]:
    """(text->item, item->text) corrections of `hubness` for items [N_items, d], texts [N_texts, d]."""
    if hubness is None:
        return None, None
    args = (chunk_size, candidate_chunk_size, progress)
    if hubness == "csls":
        r_items = _neighbour_stat(items, texts, "knn_mean", k, *args)  # [N_items]
        r_texts = _neighbour_stat(texts, items, "knn_mean", k, *args)  # [N_texts]
        return _Adjust(2.0, r_texts, r_items), _Adjust(2.0, r_items, r_texts)
    # Inverted softmax: log P(c | q) = beta s(q, c) - logsumexp over all queries q' of beta s(q', c).
    lse_items = _neighbour_stat(items, texts, "logsumexp", beta, *args)  # each item over the texts
    lse_texts = _neighbour_stat(texts, items, "logsumexp", beta, *args)  # each text over the items
    return _Adjust(float(beta), None, lse_items), _Adjust(float(beta), None, lse_texts)


def _neighbour_stat(
    rows: torch.Tensor,
    others: torch.Tensor,
    stat: str,
    param: float,
    chunk_size: int,
    other_chunk_size: int | None,
    progress: bool | None,
) -> torch.Tensor:
    """One number per row of rows [R, d] from its dot products with every row of others [O, d].

    ``"knn_mean"``: the mean of the min(param, O) highest products (a running top-k over the blocks of
    `others`, sorted, so the blocking does not change the sum). ``"logsumexp"``: logsumexp of param *
    the products, as the block maximum plus the log of a float64 sum of exponentials (two passes over
    the blocks when `others` is split). Rows in chunks of `chunk_size`, others in blocks of
    `other_chunk_size` (None: all). Returns float32 [R] on rows' device.
    """
    dev = rows.device
    n_r, n_o = rows.shape[0], others.shape[0]
    step = n_o if other_chunk_size is None else min(other_chunk_size, n_o)
    blocks = [(os_, min(os_ + step, n_o)) for os_ in range(0, n_o, step)]
    out = torch.empty(n_r, dtype=torch.float32, device=dev)
    disable = None if progress is None else not progress
    for s in tqdm(range(0, n_r, chunk_size), desc=f"hubness ({stat})", disable=disable, leave=False):
        e = min(s + chunk_size, n_r)
        r = rows[s:e]
        if stat == "knn_mean":
            k = min(int(param), n_o)
            top = None
            for bs, be in blocks:
                sim = torch.mm(r, others[bs:be].T)
                cand = sim.topk(min(k, be - bs), dim=1).values
                top = cand if top is None else torch.cat([top, cand], dim=1).topk(k, dim=1).values
            out[s:e] = top.mean(dim=1)
            continue
        peak = torch.full((e - s,), -math.inf, dtype=torch.float32, device=dev)
        sims = []
        for bs, be in blocks:
            sim = torch.mm(r, others[bs:be].T).mul_(param)
            peak = torch.maximum(peak, sim.amax(dim=1))
            if len(blocks) == 1:
                sims.append(sim)
        total = torch.zeros(e - s, dtype=torch.float64, device=dev)
        for j, (bs, be) in enumerate(blocks):
            sim = sims[j] if sims else torch.mm(r, others[bs:be].T).mul_(param)
            total += sim.sub_(peak[:, None]).exp_().sum(dim=1, dtype=torch.float64)
        out[s:e] = (peak.double() + torch.log(total)).float()
    return out


def _check_hubness(hubness: str | None, k: int, beta: float) -> None:
    if hubness is not None and hubness not in HUBNESS_METHODS:
        raise ValueError(f"hubness must be None or one of {list(HUBNESS_METHODS)}, got {hubness!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"hubness_k must be an integer >= 1, got {k!r}")
    if (
        isinstance(beta, bool)
        or not isinstance(beta, int | float | np.integer | np.floating)
        or not math.isfinite(float(beta))
        or beta <= 0
    ):
        raise ValueError(f"hubness_beta must be a finite number > 0, got {beta!r}")


def _csr(
    queries: torch.Tensor, targets: torch.Tensor, n_queries: int, n_targets: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of the pairs grouped by query, duplicates merged: (query rows with >= 1 target, ptr, cols)."""
    keys = torch.unique(queries * n_targets + targets)  # sorted, so grouped by query
    q, t = keys // n_targets, keys % n_targets
    counts = torch.bincount(q, minlength=n_queries)
    rows = torch.nonzero(counts > 0).flatten()
    ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts[rows], 0)
    return rows, ptr, t


def _prepare(
    item_emb: ArrayLike,
    text_emb: ArrayLike,
    pair_items: IndexLike,
    pair_texts: IndexLike,
    normalize: bool,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and convert: float32 [N_items, d] and [N_texts, d] on `device`, int64 [P] pairs on CPU."""
    items = _as_float_matrix("item_emb", item_emb, device)
    texts = _as_float_matrix("text_emb", text_emb, device)
    if items.shape[1] != texts.shape[1]:
        raise ValueError(
            f"embedding dimensions differ: item_emb is {tuple(items.shape)}, text_emb is {tuple(texts.shape)}"
        )
    pi = _as_index_vector("pair_items", pair_items)
    pt = _as_index_vector("pair_texts", pair_texts)
    _check_pairs(pi, pt, items.shape[0], texts.shape[0])
    if normalize:
        items, texts = _l2_normalize("item_emb", items), _l2_normalize("text_emb", texts)
    return items, texts, pi, pt


def _check_pairs(
    pi: torch.Tensor, pt: torch.Tensor, n_items: int, n_texts: int, allow_empty: bool = False
) -> None:
    if pi.shape != pt.shape:
        raise ValueError(
            f"pair_items and pair_texts must be equally long, got {pi.numel()} and {pt.numel()} entries"
        )
    if pi.numel() == 0 and not allow_empty:
        raise ValueError("there are no pairs: pair_items and pair_texts are empty")
    for name, idx, n, what in (("pair_items", pi, n_items, "items"), ("pair_texts", pt, n_texts, "texts")):
        bad = (idx < 0) | (idx >= n)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"{name}[{first}] = {int(idx[first])} is out of range for {n} {what} "
                f"({int(bad.sum())} bad entries)"
            )


def _as_float_matrix(name: str, x: ArrayLike, device: torch.device) -> torch.Tensor:
    """float32 [N, d] tensor on `device` (no copy when it already is one); refuses other shapes, NaN, inf."""
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"{name} must be a numeric array, got dtype {x.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must be a real numeric tensor, got dtype {x.dtype}")
        t = x.detach()
    else:
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, d] array, got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.float32)
    # In slices of rows: isfinite() on the whole matrix would allocate an N x d boolean copy.
    rows_per_slice = max(1, 2**22 // t.shape[1])
    if not all(
        bool(torch.isfinite(t[i : i + rows_per_slice]).all()) for i in range(0, t.shape[0], rows_per_slice)
    ):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _as_index_vector(name: str, x: IndexLike) -> torch.Tensor:
    """int64 [N] CPU tensor from an integer array, tensor or sequence; floats and bools are refused."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        arr = np.asarray(x)
        if not (
            np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating) or arr.size == 0
        ):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr if arr.size else arr.astype(np.int64)))
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D [P], got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def _to_numpy(x: object) -> np.ndarray:
    """A model's output as a numpy array: tensors are detached and moved to the CPU first."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _l2_normalize(name: str, x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation of [N, d]; a zero row has no direction and is an error."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = norms.squeeze(1) == 0
    if bool(zero.any()):
        raise ValueError(
            f"{name} row {int(torch.nonzero(zero)[0, 0])} has zero norm and cannot be normalised"
        )
    return x / norms


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    values = tuple(ks)
    if not values:
        raise ValueError("ks must name at least one K")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"every K in ks must be an integer >= 1, got {k!r}")
    return tuple(sorted({int(k) for k in values}))


def _check_chunk(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _result(
    ks: tuple[int, ...],
    t2i: np.ndarray,
    i2t: np.ndarray,
    query_texts: np.ndarray,
    query_items: np.ndarray,
    n_items: int,
    n_texts: int,
) -> RetrievalResult:
    """Summaries of rank vectors t2i [n_t2i_queries] and i2t [n_i2t_queries] (int64, 1-based)."""
    return RetrievalResult(
        ks=ks,
        t2i_recall={k: float(np.mean(t2i <= k)) for k in ks},
        i2t_recall={k: float(np.mean(i2t <= k)) for k in ks},
        t2i_mean_rank=float(np.mean(t2i)),
        t2i_median_rank=float(np.median(t2i)),
        i2t_mean_rank=float(np.mean(i2t)),
        i2t_median_rank=float(np.median(i2t)),
        n_items=n_items,
        n_texts=n_texts,
        n_t2i_queries=int(t2i.shape[0]),
        n_i2t_queries=int(i2t.shape[0]),
        t2i_ranks=t2i,
        i2t_ranks=i2t,
        t2i_query_texts=np.asarray(query_texts, dtype=np.int64),
        i2t_query_items=np.asarray(query_items, dtype=np.int64),
    )
