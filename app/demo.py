"""Running the graph from the command line: `fusemix demo` and `fusemix materialize`.

Runs go through a persistent Dagster instance under the home folder (DAGSTER_HOME), so every
materialisation also shows up in `fusemix ui` afterwards. Each run is tagged with the process that
runs it (pipelines.tracking.process_owner); a run whose process was killed stays STARTED in the
instance, and the next `fusemix demo` / `fusemix materialize` marks it failed (`fail_orphaned_runs`).

A full or read-only disk stops the command with one line (app.cli.UserError, exit status 2) naming the
folder: DAGSTER_HOME is checked before any run starts, and a run that failed on a full or read-only
disk (pipelines.storage) ends the plan there rather than failing every stage after it.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import dagster as dg
from tabulate import tabulate

from app.cli import UserError, dagster_home
from fusion.paths import fusemix_home
from pipelines.evaluate import headline
from pipelines.lake import Lake, default_lake_root
from pipelines.partitions import Partitions, sync_partitions
from pipelines.registries import load_experiments
from pipelines.storage import FAILURE_KEY, check_writable, errno_in_text, storage_error_in_text
from pipelines.tracking import OWNER_HOST, OWNER_PID, owner_gone, process_owner, this_host

STAGES = ("ingest", "extract", "experiment", "all")
# The states of a run that its process has not ended yet.
OPEN = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def instance() -> dg.DagsterInstance:
    """The persistent instance under the home folder, its runs orphaned by killed processes marked
    failed."""
    home = dagster_home()
    check_writable(home)  # a read-only or full home: one line now, not a database error mid-run
    os.environ["DAGSTER_HOME"] = str(home)
    inst = dg.DagsterInstance.get()
    for run_id in fail_orphaned_runs(inst):
        print(f"marked run {run_id} failed: the process that ran it is gone", flush=True)
    return inst


def fail_orphaned_runs(inst: dg.DagsterInstance) -> list[str]:
    """Marks failed every run of `inst` that a process of this host started from the command line
    (owner tags) and left open although that process is gone (SIGKILL, the OOM killer, a power cut).
    Runs launched from the UI carry no owner tags and are left to Dagster (its run monitoring).
    Returns the ids of the runs marked."""
    runs = inst.get_runs(dg.RunsFilter(statuses=OPEN, tags={OWNER_HOST: this_host()}))
    failed = []
    for run in runs:
        if owner_gone(run.tags):
            inst.report_run_failed(
                run, message=f"the process that ran it (pid {run.tags[OWNER_PID]}) is gone: it was killed"
            )
            failed.append(run.run_id)
    return failed


def _defs():
    from app.definitions import build_defs  # reads the registries: only when a run is asked for

    return build_defs()


# Disk errors recognised in the text of a step's error: the unambiguous ones. Permission errors count
# only where an asset reported them as a write that failed (pipelines.storage.dagster_failure).
_DISK_TEXT = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _error_text(error) -> str:
    """The message of a Dagster SerializableErrorInfo with those of its causes."""
    parts, seen = [], 0
    while error is not None and seen < 16:
        parts.append(error.message or "")
        error, seen = error.cause or error.context, seen + 1
    return "\n".join(parts)


def disk_failure(result) -> str | None:
    """The one-line message of a run that failed on a full or read-only disk, else None."""
    for ev in result.all_events:
        if not ev.is_failure or ev.event_specific_data is None:
            continue
        failure = getattr(ev.event_specific_data, "user_failure_data", None)
        if failure is not None and FAILURE_KEY in (failure.metadata or {}):
            return failure.description
        error = getattr(ev.event_specific_data, "error", None)
        found = storage_error_in_text(_error_text(error), fusemix_home(), _DISK_TEXT) if error else None
        if found is not None:
            return str(found)
    return None


class _ShortDiskFailures(logging.Filter):
    """Cuts the stack traces from the console lines of a step or run that failed on a full or
    read-only disk: the error's first line already says which folder and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Stack Trace:" not in message:
            return True
        if "pipelines.storage.StorageError" in message or errno_in_text(message) in _DISK_TEXT:
            record.msg, record.args = message.split("Stack Trace:", 1)[0].rstrip(), ()
        return True


@dg.logger(
    config_schema=dg.colored_console_logger.config_schema,
    description="Dagster's colored console logger, without stack traces for full or read-only disks",
)
def console_logger(init_context) -> logging.Logger:
    logger = dg.colored_console_logger.logger_fn(init_context)
    logger.addFilter(_ShortDiskFailures())
    return logger


def _run(defs: dg.Definitions, job: str, partition, inst: dg.DagsterInstance, quiet: bool = False) -> bool:
    t0 = time.perf_counter()
    label = partition if isinstance(partition, str) else "|".join(partition.keys_by_dimension.values())
    print(f"-> {job} [{label}] ...", flush=True)
    job_def = defs.resolve_job_def(job).with_logger_defs({"console": console_logger})
    result = job_def.execute_in_process(
        partition_key=partition,
        instance=inst,
        raise_on_error=False,
        tags=process_owner(),
        # Step-by-step DEBUG events go to the run's log in the UI; the terminal gets INFO and up.
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING" if quiet else "INFO"}}}},
    )
    status = "ok" if result.success else "FAILED"
    print(f"   {status} in {time.perf_counter() - t0:.1f}s", flush=True)
    disk = None if result.success else disk_failure(result)
    if disk is not None:
        raise UserError(disk)  # the stages after it would fail the same way
    if not result.success:
        for ev in result.all_events:
            if (
                ev.is_failure
                and ev.event_specific_data is not None
                and getattr(ev.event_specific_data, "error", None)
            ):
                print("   " + ev.event_specific_data.error.message.strip().splitlines()[-1])
    return result.success


def with_anchors(parts: Partitions, experiments: list[str]) -> list[str]:
    """The experiments with the anchors they bind to, every anchor before the experiments bound to it
    (an anchored experiment trains against its anchor's checkpoint)."""
    anchors = [parts.experiments[e].anchor for e in experiments if parts.experiments[e].anchor]
    wanted = list(dict.fromkeys([*experiments, *anchors]))
    return sorted(wanted, key=lambda e: parts.experiments[e].anchor is not None)


def run_plan(defs, parts: Partitions, inst, experiments: list[str]) -> bool:
    """Ingest the datasets these experiments use (those they are also scored on included), extract
    what their encoders need on each, then run them."""
    sync_partitions(parts, inst)  # the registry sensor does the same in the UI
    experiments = with_anchors(parts, experiments)
    exps = [parts.experiments[e] for e in experiments]
    used = {e.name: (e.dataset, *e.eval_datasets) for e in exps}
    datasets = sorted({d for ds in used.values() for d in ds})
    ok = all(_run(defs, "ingest_job", d, inst) for d in datasets)
    needed = sorted(
        {(d, enc) for e in exps for d in used[e.name] for enc in (e.media_encoder, e.text_encoder)}
    )
    ok = ok and all(_run(defs, "extract_job", parts.extract_key(d, enc), inst) for d, enc in needed)
    ok = ok and all([_run(defs, "experiment_job", e, inst) for e in experiments])
    return ok


def emergent_tables(experiments: list[str]) -> dict[str, str]:
    """experiment -> its emergent retrieval table (direct, two-step, chance), for anchored experiments
    that have been evaluated."""
    from evaluation.crossmodal import emergent_table_markdown

    out, rows = {}, metric_rows()
    for e in experiments:
        values = {
            r["metric"]: (r["value"], r["std"])
            for r in rows
            if r["experiment"] == e and r["gallery"] == "emergent" and r["seed"] is None
        }
        if values:
            out[e] = emergent_table_markdown(values, ("audio", "image"))
    return out


def metric_rows() -> list[dict]:
    """The rows of the lake's `metrics` table (none before the first evaluation)."""
    lake = Lake(default_lake_root())
    return lake.read("metrics").to_pylist() if lake.exists("metrics") else []


def retrieval_table(experiments: list[str]) -> str:
    """The demo's table: test items, Recall@1/5/10 both ways and chance at R@1, in percent."""
    rows = metric_rows()
    if not rows:
        return "(no metrics yet)"
    specs = load_experiments()
    by = {
        e: headline([r for r in rows if r["experiment"] == e], specs[e].dataset)
        for e in experiments
        if e in specs
    }
    cols = [f"{d}_recall_at_{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    cols += ["chance_t2i_recall_at_1", "chance_i2t_recall_at_1"]
    head = ["experiment", "items", "t2i R@1", "R@5", "R@10", "i2t R@1", "R@5", "R@10", "chance", "chance"]
    table = []
    for e in experiments:
        m = by.get(e)
        if not m:
            table.append([e, "(not evaluated)"] + [""] * (len(head) - 2))
            continue
        table.append([e, int(m.get("test_items", 0))] + [100 * m.get(c, float("nan")) for c in cols])
    return tabulate(table, headers=head, tablefmt="simple", floatfmt=".1f", disable_numparse=False)


def run_demo(family: str = "demo") -> int:
    t0 = time.perf_counter()
    defs, parts = _defs()
    experiments = sorted(e for e, spec in parts.experiments.items() if spec.family == family)
    if not experiments:
        print(f"no experiments of family {family!r} in experiments.yaml")
        return 2
    inst = instance()
    ok = run_plan(defs, parts, inst, experiments)
    if family != "demo":  # the family's ablation table and plot, with an MLflow parent run
        ok = _run(defs, "report_job", family, inst) and ok
    home = fusemix_home()
    print()
    print(
        f"Retrieval on held-out concepts (test split), recall in %, chance = Recall@1 of a random ranking "
        f"(text->item, item->text); {time.perf_counter() - t0:.0f}s in all"
    )
    print(retrieval_table(experiments))
    print()
    for name, table in emergent_tables(experiments).items():
        print(
            f"{name}: emergent audio <-> image retrieval, never trained on (recall in %, mean ± std over seeds)"
        )
        print(table)
        print()
    if family != "demo":
        print(f"Ablation table and plot: {home / 'reports' / 'families' / family}.md")
        print()
    print("Where to look next:")
    print(f"  reports        {home / 'reports'}/<experiment>/report.md")
    print("  Dagster UI     fusemix ui          (http://127.0.0.1:3000)")
    print("  MLflow UI      fusemix mlflow-ui   (http://127.0.0.1:5000)")
    print('  SQL            fusemix sql --saved best_runs   or   fusemix sql "SELECT * FROM metrics"')
    print('  search         fusemix search "a smiling face" --experiment emoji-fusemix')
    return 0 if ok else 1


def materialize(stage: str, partition: str | None = None) -> int:
    """Materialises one stage (all its partitions, or one) or everything (`all`)."""
    if stage not in STAGES:
        print(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")
        return 2
    defs, parts = _defs()
    inst = instance()
    sync_partitions(parts, inst)  # the registry sensor does the same in the UI
    if stage in ("experiment", "all"):
        exps = [partition] if partition else sorted(parts.experiments)
        unknown = [e for e in exps if e not in parts.experiments]
        if unknown:
            print(f"unknown experiment {unknown[0]!r}; known: {', '.join(sorted(parts.experiments))}")
            return 2
        return 0 if run_plan(defs, parts, inst, exps) else 1
    if stage == "ingest":
        keys = [partition] if partition else sorted(parts.datasets)
        return 0 if all([_run(defs, "ingest_job", k, inst) for k in keys]) else 1
    specs = parts.encoders()
    if partition:
        dataset, _, encoder = partition.partition("|")
        keys = [(dataset, encoder)]
    else:
        keys = [(d, e) for d in sorted(parts.datasets) for e in sorted(specs) if parts.applies(d, specs[e])]
    return 0 if all([_run(defs, "extract_job", parts.extract_key(d, e), inst) for d, e in keys]) else 1
