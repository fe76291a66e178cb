-- Rejected inputs per dataset x reason, most frequent first, with one example item each.
SELECT
    dataset,
    reason,
    count(*) AS n,
    min(item) AS example_item
FROM quarantine
GROUP BY dataset, reason
ORDER BY dataset, n DESC, reason
