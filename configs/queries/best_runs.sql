-- The best run of each experiment (per scored dataset and split) by one metric, default
-- t2i_recall_at_1: the mean over the experiment's seeds, pooled gallery, with its std.
-- split: one split name, or '*' for a row per split; ties go to the latest run.
-- @param metric = t2i_recall_at_1
-- @param split = *
SELECT experiment, method, metric, value, std, n_seeds, mlflow_run_id AS run_id, created_at, split, dataset,
       fingerprint_media, fingerprint_text
FROM (
    SELECT *,
           row_number() OVER (PARTITION BY experiment, dataset, split ORDER BY value DESC, created_at DESC) AS rank
    FROM metrics
    WHERE metric = $metric AND ($split = '*' OR split = $split) AND seed IS NULL AND gallery = 'pooled'
)
WHERE rank = 1
ORDER BY experiment, dataset, split
