"""Curate: partition (experiment) -> `curated__{experiment}`, the selected pairs (quantity, quality,
diversity ablations), plus the blocking data contract checked before any training."""

import dagster as dg
import numpy as np

from pipelines.lake import table_name
from pipelines.partitions import Partitions
from pipelines.resources import EncoderBank, LanceLake
from pipelines.training import curate


def build(parts: Partitions) -> list:
    @dg.asset(
        name="curated",
        group_name="curate",
        partitions_def=parts.experiment,
        deps=[
            dg.AssetDep("pairs", partition_mapping=dg.AllPartitionMapping()),
            dg.AssetDep("latents", partition_mapping=dg.AllPartitionMapping()),
        ],
        kinds={"lance"},
        description="The experiment's training pairs (val and test whole)",
    )
    def curated(context: dg.AssetExecutionContext, lake: LanceLake, encoders: EncoderBank):
        exp = parts.experiments[context.partition_key]
        lk = lake.lake()
        media_fp, text_fp = (
            encoders.get(exp.media_encoder).fingerprint,
            encoders.get(exp.text_encoder).fingerprint,
        )
        table, info = curate(lk, exp, media_fp, text_fp)
        version = lk.overwrite(table_name("curated", exp.name), table)
        return dg.MaterializeResult(
            metadata={
                **info,
                "lance_version": version,
                "read_versions": dg.MetadataValue.json(
                    lk.versions(
                        [
                            table_name("pairs", exp.dataset),
                            *(
                                table_name("latents", exp.dataset, e)
                                for e in (exp.media_encoder, exp.text_encoder)
                            ),
                        ]
                    )
                ),
            }
        )

    @dg.asset_check(
        asset=curated,
        blocking=True,
        description=(
            "Every item of the experiment's pairs that extraction did not quarantine has a latent with the "
            "current fingerprint and the registry's dimension, and no NaN or inf"
        ),
    )
    def latents_ready(context: dg.AssetCheckExecutionContext, lake: LanceLake, encoders: EncoderBank):
        exp = parts.experiments[context.partition_key] if context.has_partition_key else None
        lk = lake.lake()
        problems, checked = [], {}
        cur = lk.read(table_name("curated", exp.name))
        pairs = lk.read(table_name("pairs", exp.dataset))
        quar_t = table_name("quarantine", exp.dataset)
        cap_col = "caption_id" if exp.caption == "clean" else "raw_caption_id"
        for col, pair_col, name in (
            ("media_id", "media_id", exp.media_encoder),
            ("caption_id", cap_col, exp.text_encoder),
        ):
            enc = encoders.get(name)
            # curate() leaves out pairs without a current latent, so the curated table alone would
            # always pass: the contract is on every paired item, less those extraction quarantined
            # (those are known bad and reported there).
            failed = lk.ids(quar_t, "item", f"stage = 'extract:{name}'")
            paired = {i for i in pairs[pair_col].to_pylist() if i is not None} - failed
            want = set(cur[col].to_pylist()) | paired
            lat_t = table_name("latents", exp.dataset, name)
            if not lk.exists(lat_t):
                checked[name] = {"items": len(want), "missing": len(want), "dim": None, "nonfinite": 0}
                problems.append(f"no {lat_t} table: run extract_job for ({exp.dataset}, {name})")
                continue
            lat = lk.read(lat_t, ["media_id", "vector", "fingerprint"])
            ids = lat["media_id"].to_pylist()
            current = {
                m for m, f in zip(ids, lat["fingerprint"].to_pylist(), strict=True) if f == enc.fingerprint
            }
            missing = len(want - current)
            dim = lat.schema.field("vector").type.list_size
            flat = (
                lat["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
                if len(lat)
                else np.zeros(0)
            )
            nonfinite = int((~np.isfinite(flat)).sum())
            checked[name] = {"items": len(want), "missing": missing, "dim": dim, "nonfinite": nonfinite}
            if missing:
                problems.append(f"{missing} of {len(want)} {col} without a current {name} latent")
            if dim != enc.dim:
                problems.append(f"{name} latents are {dim}-d, the encoder gives {enc.dim}-d")
            if nonfinite:
                problems.append(f"{nonfinite} NaN/inf values in {name} latents")
        return dg.AssetCheckResult(
            passed=not problems,
            description="; ".join(problems) or "all curated items encoded",
            metadata={"checked": dg.MetadataValue.json(checked)},
        )

    return [curated, latents_ready]
