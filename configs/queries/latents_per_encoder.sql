-- Latents per dataset x encoder: rows, dimension and the encoder fingerprints they were made with.
-- More than one fingerprint for a pair means the encoder changed under the table: re-extract it.
SELECT
    dataset,
    encoder,
    count(*) AS latents,
    any_value(dim) AS dim,
    count(DISTINCT fingerprint) AS n_fingerprints,
    string_agg(DISTINCT fingerprint, ',' ORDER BY fingerprint) AS fingerprints
FROM latents_meta
GROUP BY dataset, encoder
ORDER BY dataset, encoder
