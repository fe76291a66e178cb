"""Jobs, the registry and experiment sensors and the extraction schedule.

Which (dataset, encoder) pairs are kept current (`kept_current`): an encoder is extracted for the
datasets of the experiments that use it (their own and their `eval_datasets`); an encoder no
experiment uses is extracted for every dataset it applies to only if it is eager: `eager: true` in
encoders.yaml, or added to the registry after the sensor first ran (an encoder you add). `eager:
false` never extracts by itself. So the first start of the UI extracts what the experiments need and
nothing else.

The registry sensor reads configs/*.yaml on every tick and brings the dynamic partitions in step
(pipelines.partitions: datasets, experiments and families added and removed, encoders added: every
encoder is a partition, so any can be run by hand), and each kept-current (dataset, encoder) of an ingested dataset gets one extraction per
encoder fingerprint (run key `extract:{dataset}:{encoder}:{fingerprint}`): adding an encoder or
changing its settings or weights extracts it again, an unchanged one never twice. The schedule (on by
default, nightly) requests extraction only where media of the encoder's modality still lack a latent
of its current fingerprint, so a tick with nothing new launches nothing. The experiment sensor records
each experiment's inputs as the data version of `experiment_inputs` when they change (assets.curate),
which is what marks exactly those experiments stale, and re-runs the ones with `auto_run: true`.
"""

from __future__ import annotations

import json

import dagster as dg

from assets.curate import DATA_VERSION_TAG, INPUTS, inputs_event
from fusion.encoders import EncoderSpec
from pipelines.curate import experiment_state
from pipelines.lake import Lake, sql_str
from pipelines.partitions import ENCODER_PARTITIONS, EXPERIMENT_PARTITIONS, Partitions
from pipelines.resources import EncoderBank, LanceLake, PipelinePaths
from pipelines.schemas import table_name
from pipelines.train import anchor_state

ABLATION_FAMILIES = ("quantity", "quality", "diversity", "augmentation")


def build_jobs(parts: Partitions) -> dict[str, dg.UnresolvedAssetJobDefinition]:
    jobs = {
        "ingest_job": dg.define_asset_job(
            "ingest_job", selection=dg.AssetSelection.groups("ingest"), partitions_def=parts.dataset
        ),
        "extract_job": dg.define_asset_job(
            "extract_job", selection=dg.AssetSelection.groups("extract"), partitions_def=parts.extract
        ),
        "experiment_job": dg.define_asset_job(
            "experiment_job",
            selection=dg.AssetSelection.groups("curate", "train", "evaluate", "serve"),
            partitions_def=parts.experiment,
            description=(
                "Curate, train and evaluate one experiment and embed its datasets for search "
                "(the demo and every ablation run this job)"
            ),
        ),
        "report_job": dg.define_asset_job(
            "report_job",
            selection=dg.AssetSelection.groups("report"),
            partitions_def=parts.family,
            description="A family's ablation report, after its experiments ran",
        ),
    }
    return jobs


def kept_current(parts: Partitions, first_seen: set[str]) -> dict[str, list[str]]:
    """encoder -> the datasets whose latents of it are kept current (see the module docstring);
    `first_seen`: the encoders of the registry when the sensor first ran."""
    specs = parts.encoders()
    used: dict[str, set[str]] = {}
    for exp in parts.experiments.values():
        for name in (exp.media_encoder, exp.text_encoder):
            used.setdefault(name, set()).update((exp.dataset, *exp.eval_datasets))
    out = {}
    for name, spec in specs.items():
        if spec.eager is False:
            continue
        if name in used:
            datasets = used[name]
        elif spec.eager or name not in first_seen:
            datasets = set(parts.datasets)
        else:
            continue
        out[name] = sorted(d for d in datasets if d in parts.datasets and parts.applies(d, spec))
    return out


def outstanding(lake: Lake, dataset: str, spec: EncoderSpec, fingerprint: str) -> int:
    """How many media of the dataset (of the encoder's modality) have no latent of `fingerprint` and
    did not already fail with this encoder: what an extraction run would encode (read only)."""
    want = lake.ids(table_name("media", dataset), filter=f"modality = {sql_str(spec.modality)}")
    have = lake.ids(table_name("latents", dataset, spec.name), filter=f"fingerprint = {sql_str(fingerprint)}")
    failed = lake.ids(
        table_name("quarantine", dataset), "item", filter=f"stage = {sql_str('extract:' + spec.name)}"
    )
    return len(want - have - failed)


def _fingerprints(bank: EncoderBank, names, log) -> dict[str, str]:
    """Each encoder's current fingerprint (weights not loaded); one that cannot be described (weights
    missing) is left out with a warning."""
    out = {}
    for name in names:
        try:
            out[name] = bank.ref(name).fingerprint
        except Exception as err:  # EncoderUnavailable, EncoderConfigError, a broken folder ...
            log.warning(f"encoder {name}: {err}; not extracted until it can be loaded")
    return out


def build_sensor(parts: Partitions) -> dg.SensorDefinition:
    @dg.sensor(
        name="registry_sensor",
        job_name="extract_job",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Keeps the partitions in step with configs/*.yaml (datasets, experiments and families added "
            "and removed, encoders added) and extracts the encoders experiments use (and eager ones) "
            "whenever one is added or its fingerprint changes"
        ),
    )
    def registry_sensor(context: dg.SensorEvaluationContext, lake: LanceLake, encoders: EncoderBank):
        specs = parts.encoders()
        state = json.loads(context.cursor) if context.cursor else {}
        first_seen = set(state.get("first_seen", specs))
        changes = parts.partition_requests(context.instance)
        for req in changes:
            verb = "adding" if isinstance(req, dg.AddDynamicPartitionsRequest) else "removing"
            context.log.info(f"{verb} {req.partitions_def_name} partitions {', '.join(req.partition_keys)}")
        current = kept_current(parts, first_seen)
        fps = _fingerprints(encoders, sorted(current), context.log)
        lk = lake.lake()
        # One run per (dataset, encoder, fingerprint): Dagster skips a run key it has seen.
        requests = [
            dg.RunRequest(
                run_key=f"extract:{dataset}:{name}:{fps[name]}",
                job_name="extract_job",
                partition_key=parts.extract_key(dataset, name),
                tags={"fusemix/fingerprint": fps[name]},
            )
            for name, datasets in current.items()
            if name in fps
            for dataset in datasets
            if lk.exists(table_name("media", dataset))
        ]
        return dg.SensorResult(
            dynamic_partitions_requests=changes,
            run_requests=requests,
            cursor=json.dumps({"first_seen": sorted(first_seen)}),
        )

    return registry_sensor


def recorded_state(instance: dg.DagsterInstance, experiment: str) -> str | None:
    """The data version last recorded for the experiment's inputs (by a run or by the sensor)."""
    record = instance.get_latest_data_version_record(dg.AssetKey(INPUTS), False, experiment)
    if record is None:
        return None
    return record.asset_materialization.tags.get(DATA_VERSION_TAG) if record.asset_materialization else None


def build_experiment_sensor(parts: Partitions) -> dg.SensorDefinition:
    @dg.sensor(
        name="experiment_sensor",
        job_name="experiment_job",
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Records each experiment's inputs (configuration, encoder fingerprints, Lance versions of "
            "its pairs and latents, a bound experiment's anchor checkpoints) as the data version of "
            "experiment_inputs, so that exactly the experiments whose inputs changed show as stale; re-runs those with `auto_run: true` (an "
            "unchanged checkpoint is not retrained)"
        ),
    )
    def experiment_sensor(
        context: dg.SensorEvaluationContext, lake: LanceLake, encoders: EncoderBank, paths: PipelinePaths
    ):
        lk = lake.lake()
        known = set(context.instance.get_dynamic_partitions(EXPERIMENT_PARTITIONS))
        exps = parts.experiments
        names = sorted({n for e in exps.values() for n in (e.media_encoder, e.text_encoder)})
        fps = _fingerprints(encoders, names, context.log)
        events, requests = [], []
        for name, exp in sorted(exps.items()):
            if name not in known or exp.media_encoder not in fps or exp.text_encoder not in fps:
                continue  # the registry sensor adds the partition on its next tick
            anchor = anchor_state(paths.models_dir, exp, parts.experiments)
            state = experiment_state(lk, exp, (fps[exp.media_encoder], fps[exp.text_encoder]), anchor)
            if state is None:
                context.log.info(f"{name}: its pairs or latents are not in the lake yet")
                continue
            if recorded_state(context.instance, name) != state:
                events.append(inputs_event(name, state))
            if exp.auto_run:
                requests.append(
                    dg.RunRequest(
                        run_key=f"experiment:{name}:{state}", job_name="experiment_job", partition_key=name
                    )
                )
        return dg.SensorResult(
            run_requests=requests,
            asset_events=events,
            skip_reason=None if requests else "no experiment with auto_run: true has new inputs",
        )

    return experiment_sensor


def build_schedule(parts: Partitions) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="refresh_latents_schedule",
        job_name="extract_job",
        cron_schedule="0 3 * * *",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=(
            "Nightly: encode media ingested since the last run, only where an encoder partition has "
            "media without a current latent"
        ),
    )
    def refresh_latents(context: dg.ScheduleEvaluationContext, lake: LanceLake, encoders: EncoderBank):
        specs = parts.encoders()
        names = [e for e in context.instance.get_dynamic_partitions(ENCODER_PARTITIONS) if e in specs]
        fps = _fingerprints(encoders, names, context.log)
        lk = lake.lake()
        stamp = f"{context.scheduled_execution_time:%Y%m%d%H%M}"
        requests = [
            dg.RunRequest(
                run_key=f"refresh-{stamp}:{dataset}:{name}",
                job_name="extract_job",
                partition_key=parts.extract_key(dataset, name),
            )
            for name, fp in fps.items()
            for dataset in parts.datasets
            if parts.applies(dataset, specs[name])
            and lk.exists(table_name("latents", dataset, name))  # extracted before: keep it current
            and outstanding(lk, dataset, specs[name], fp) > 0
        ]
        return requests or dg.SkipReason("every extracted (dataset, encoder) is current")

    return refresh_latents
