"""Evaluation of fused models: retrieval metrics, example queries, reports and ablation tables.

The one place where a split is scored and reported; the pipeline only reads the lake and calls these.

- `evaluation.retrieval`: the protocol. `paired_ids` and `PairedSplit` (a split's unique items and
  texts with their latents and positive pairs), `retrieval_metrics` (Recall@K and ranks in both
  directions over the pairs, chunked over queries and candidates; `naive_retrieval` is the
  full-matrix reference), `chance_levels` / `chance_recall` (the same for a random ranking) and
  `evaluate_model` (embed a split with a model's two sides, then score it).
- `evaluation.examples`: `query_examples`, a few seeded text queries with their top items.
- `evaluation.report`: `write_report`, one experiment's report.md with its plots (loss, Recall@K,
  PCA map of the shared space), and the formatting helpers and `markdown_table` (the package's one
  table printer).
- `evaluation.ablation`: one ablation family from the rows of the lake's metrics table:
  `ablation_table`, `plot_ablation` and `ablation_report` (both in one markdown file).

May import `fusion`; never an orchestration or storage library (dagster, lance, mlflow, duckdb).
"""
