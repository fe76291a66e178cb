"""The `fusemix` command line (entry point `fusemix = "app.cli:main"`).

    fusemix data list                              the default-corpus sources
    fusemix data fetch notes --limit 8             fetch into the data cache and print its report
    fusemix encoder list                           the encoder registry and what is available here
    fusemix encoder add NAME --modality text --source hf --model BAAI/bge-small-en-v1.5
    fusemix sql "SELECT dataset, count(*) FROM pairs GROUP BY ALL"   [--csv]
    fusemix sql --saved best_runs --param metric=i2t_recall_at_1
    fusemix search "a red apple" --experiment emoji-fusemix -k 5
    fusemix search --image cat.png --experiment emoji-fusemix [--target text|image] [--dataset D]
    fusemix ui [--port 3000]                       Dagster UI (dagster dev -w workspace.yaml)
    fusemix mlflow-ui [--port 5000]                MLflow UI over <FUSEMIX_HOME>/mlflow/mlflow.db
    fusemix serve [--port 8000]                    search page and JSON API over the trained experiments (app.web)
    fusemix demo [--family demo]                   ingest, extract, train and evaluate a family
    fusemix compare REF OTHER... [-k 1] [--plot F] REF's Recall@k minus each OTHER's on the same test queries,
                                                   with a paired-bootstrap interval (evaluation.significance)
    fusemix materialize STAGE|all [--partition KEY]

Files live under FUSEMIX_HOME (fusion.paths): Lance tables in <home>/lance (or $FUSEMIX_LAKE, a folder or
an s3:// prefix, for every command; --lake for sql and search),
models in <home>/models, MLflow in <home>/mlflow, DAGSTER_HOME in <home>/dagster (unless set). User errors exit
with status 2 and a one-line message, and so do writes that a full or read-only disk refuses (the line
names the folder and what to do); servers bind to 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import numbers
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from fusion.paths import PROJECT_ROOT, cache_dir, configs_dir, fusemix_home

# The project's Dagster instance settings, written into a dagster.yaml that is missing or empty (one
# you edited is left alone): telemetry and the UI's onboarding dialog off (set `telemetry: enabled:
# true` to send Dagster usage statistics), one queued run per partition at a time (app.definitions,
# "Concurrency").
INSTANCE_YAML = """\
telemetry:
  enabled: false
nux:
  enabled: false
concurrency:
  runs:
    tag_concurrency_limits:
      - key: dagster/partition
        value:
          applyLimitPerUniqueValue: true
        limit: 1
"""


def dagster_home() -> Path:
    """Dagster's instance folder: $DAGSTER_HOME, else <FUSEMIX_HOME>/dagster, with the project's
    dagster.yaml (INSTANCE_YAML) unless one with content is there already."""
    home = Path(os.environ.get("DAGSTER_HOME") or fusemix_home() / "dagster")
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() or not config.read_text(encoding="utf-8").strip():
        config.write_text(INSTANCE_YAML, encoding="utf-8")
    return home


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Tables


# Characters a terminal or a bidi-aware viewer would act on rather than show: C0/C1 controls
# (escape sequences, carriage returns), DEL, and the Unicode bidi overrides and isolates.
_UNSAFE = {*range(0x00, 0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _UNSAFE}
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def visible(text: str, keep: str = "") -> str:
    """`text` with every control character (except those in `keep`) written as a visible escape such
    as \\x1b, so printed data cannot move the cursor, clear the screen or reorder a line."""
    table = {c: e for c, e in _ESCAPES.items() if chr(c) not in keep}
    return text.translate(table)


def csv_cell(value: object) -> object:
    """A CSV cell that no spreadsheet runs as a formula and that carries no control characters:
    text starting with = + - @ tab or CR gets a leading apostrophe; numbers stay numbers."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if isinstance(value, numbers.Number | dt.datetime | dt.date):
        return value
    text = str(value)
    if text.startswith(_FORMULA_START):
        text = "'" + text
    return visible(text, keep="\n")


def format_cell(value: object, max_width: int = 40) -> str:
    """One cell as short single-line text: bytes as their size, floats to 6 significant digits,
    lists abbreviated, anything longer than `max_width` cut with an ellipsis."""
    if value is None:
        text = ""
    elif isinstance(value, bytes | bytearray):
        text = f"<{len(value)} bytes>"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, dt.datetime):
        text = value.isoformat(sep=" ", timespec="seconds")
    elif isinstance(value, list | tuple):
        head = ", ".join(format_cell(v, max_width) for v in value[:4])
        text = f"[{head}{', …' if len(value) > 4 else ''}] ({len(value)})"
    else:
        text = str(value)
    text = " ".join(text.split()) if ("\n" in text or "\t" in text) else text
    text = visible(text)
    if max_width > 0 and len(text) > max_width:
        text = text[: max(1, max_width - 1)] + "…"
    return text


def format_table(columns: Sequence[str], rows: Sequence[Sequence[object]], max_width: int = 40) -> str:
    """An aligned text table (tabulate's "simple" layout): header, rule, rows; numbers right-aligned."""
    from tabulate import tabulate

    numeric = [
        bool(rows)
        and all(isinstance(r[i], int | float) and not isinstance(r[i], bool) or r[i] is None for r in rows)
        for i in range(len(columns))
    ]
    cells = [[format_cell(v, max_width) for v in row] for row in rows]
    align = ["right" if num else "left" for num in numeric]
    return tabulate(cells, headers=list(columns), tablefmt="simple", disable_numparse=True, colalign=align)


def print_arrow(table, as_csv: bool, max_width: int, max_rows: int) -> None:
    rows = table.to_pylist()
    columns = table.column_names
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([csv_cell(c) for c in columns])
        for r in rows:
            writer.writerow([csv_cell(r[c]) for c in columns])
        return
    shown = rows if max_rows <= 0 else rows[:max_rows]
    print(format_table(columns, [[r[c] for c in columns] for r in shown], max_width))
    more = f", {len(rows) - len(shown)} not shown (--max-rows)" if len(shown) < len(rows) else ""
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''}{more})")


# ---------------------------------------------------------------------------------------------
# Subcommands


def _lake_root(args) -> str:
    from pipelines.lake import default_lake_root

    return args.lake or default_lake_root()


def cmd_data_list(args) -> int:
    from pipelines.sources import SOURCES

    rows = []
    for name, fetch in sorted(SOURCES.items()):
        doc = (fetch.__doc__ or "").strip().splitlines()
        rows.append([name, doc[0] if doc else ""])
    print(format_table(["source", "description"], rows, max_width=100))
    return 0


def cmd_data_fetch(args) -> int:
    from pipelines.sources import SourceUnavailable, UnknownSource, fetch_source, report_dataset

    cache = cache_dir("data")
    try:
        ds = fetch_source(args.name, cache=cache, limit=args.limit, seed=args.seed, progress=not args.quiet)
    except (UnknownSource, SourceUnavailable) as err:
        raise UserError(str(err)) from err
    print(report_dataset(ds))
    print(f"cached under {cache}")
    return 0


def cmd_encoder_list(args) -> int:
    from fusion.encoders import describe_registry, load_registry

    rows = describe_registry(load_registry())
    cols = ["name", "modality", "source", "model", "available", "detail"]
    table = [[r[c] if c != "available" else ("yes" if r[c] else "no") for c in cols] for r in rows]
    print(format_table(cols, table, args.max_width))
    return 0


def cmd_encoder_add(args) -> int:
    from fusion.encoders import add_encoder
    from fusion.encoders.registry import default_registry_path
    from pipelines.schemas import table_name

    try:
        table_name("latents", "dataset", args.name)  # the name becomes part of Lance table names
    except ValueError as err:
        raise UserError(f"encoder name {args.name!r} is not usable: {err}") from err
    fields = {"modality": args.modality, "source": args.source, "model": args.model}
    if args.pooling is not None:
        fields["pooling"] = args.pooling
    if args.batch_size is not None:
        fields["batch_size"] = args.batch_size
    if args.option:
        import yaml

        options = {}
        for item in args.option:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UserError(f"--option takes KEY=VALUE, got {item!r}")
            # Read as YAML, as in encoders.yaml: enable_fusion=false is a bool, a path stays a string.
            try:
                options[key] = yaml.safe_load(value) if value else ""
            except yaml.YAMLError as err:
                raise UserError(f"--option {key}: {value!r} is not a YAML value: {err}") from err
        fields["options"] = options
    path = default_registry_path()
    spec = add_encoder(path, args.name, **fields)
    print(f"added encoder {spec.name!r} ({spec.modality}, {spec.source}: {spec.model}) to {path}")
    print(
        "the Dagster sensor will pick it up and start extracting latents for every dataset of that modality"
    )
    return 0


def _parse_params(pairs: Sequence[str]) -> dict[str, str]:
    params = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param takes KEY=VALUE, got {item!r}")
        params[key] = value
    return params


def cmd_sql(args) -> int:
    from pipelines.catalog import Catalog, saved_queries

    if args.list:
        for name in saved_queries():
            print(name)
        return 0
    if (args.query is None) == (args.saved is None):
        raise UserError("give a query or --saved NAME (one of the two)")
    params = _parse_params(args.param)
    root = _lake_root(args)
    try:
        catalog = Catalog(root)
    except OSError as err:  # the lake folder is missing and cannot be created (a read-only home)
        from pipelines.storage import disk_errno

        if disk_errno(err) is None or "://" in root or Path(root).is_dir():
            raise
        raise UserError(
            f"there is no lake at {root} yet, and it cannot be created there ({err}); "
            "run `fusemix materialize` with a writable FUSEMIX_HOME first, or give --lake"
        ) from err
    if args.saved is not None:
        table = catalog.saved(args.saved, **params)
    else:
        if params:
            raise UserError("--param is for saved queries; write values into the query")
        table = catalog.sql(args.query)
    print_arrow(table, args.csv, args.max_width, args.max_rows)
    return 0


def cmd_compare(args) -> int:
    from evaluation.significance import compare_experiments, differences_markdown
    from pipelines.evaluate import stored_ranks
    from pipelines.lake import Lake

    names = list(dict.fromkeys([args.reference, *args.others]))
    if len(names) < 2:
        raise UserError("give the reference and at least one other experiment")
    rows = stored_ranks(Lake(_lake_root(args)), names)
    missing = [n for n in names if n not in {r["experiment"] for r in rows}]
    if missing:
        raise UserError(
            f"no test ranks stored for {', '.join(missing)}: evaluate it first (`fusemix demo --family F` "
            "or `fusemix materialize experiment --partition EXPERIMENT`)"
        )
    found = compare_experiments(rows, args.reference, k=args.k, resamples=args.resamples)
    if not found:
        raise UserError(f"{', '.join(names)} share no scored test queries (different datasets or splits)")
    print(differences_markdown(args.reference, found, args.k))
    if args.plot:
        from evaluation.significance import plot_differences

        print(f"plot: {plot_differences(args.reference, found, Path(args.plot), args.k)}")
    return 0


def cmd_search(args) -> int:
    from fusion.media import MediaError, read_bytes
    from pipelines.lake import Lake
    from pipelines.search import Searcher, SearchError, format_results

    queries = {"text": args.query, "image": args.image, "audio": args.audio}
    given = {side: q for side, q in queries.items() if q is not None}
    if len(given) != 1:
        raise UserError("give one query: a text, --image PATH or --audio PATH")
    ((side, query),) = given.items()
    searcher = Searcher(Lake(_lake_root(args)), fusemix_home() / "models")
    try:
        payload = query if side == "text" else read_bytes(Path(query), "query", searcher.limits)
        target = args.target or searcher.default_target(args.experiment, side)
        results = searcher.query(args.experiment, target, k=args.k, dataset=args.dataset, **{side: payload})
    except (SearchError, MediaError) as err:
        raise UserError(str(err)) from err
    print(visible(format_results(results), keep="\n"))
    return 0


def _tool(name: str) -> str:
    """The executable of a tool installed beside this Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UserError(f"`{name}` is not installed in this environment (make install)")
    return found


def serve(argv: list[str], env: dict[str, str], grace_s: float, after=None) -> int:
    """The server in its own session, stopped with everything it started on Ctrl-C/SIGTERM (app.serve)."""
    from app.serve import serve as run_server

    sys.stdout.flush()
    sys.stderr.flush()
    return run_server(argv, env, grace_s=grace_s, after=after)


def _cancel_ui_runs(home: Path) -> None:
    """After the UI stopped: its runs still in flight are marked canceled (nothing runs them now)."""
    import dagster as dg

    from app.serve import cancel_runs_in_flight
    from pipelines.tracking import OWNER_PID, owner_gone

    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        ids = cancel_runs_in_flight(instance, lambda tags: OWNER_PID in tags and not owner_gone(tags))
    for run_id in ids:
        print(f"run {run_id} was in flight: marked canceled", flush=True)


def _sync_partitions(home: Path) -> None:
    """The partitions of configs/*.yaml in the instance before the UI opens (the registry sensor keeps
    them in step afterwards); a registry that does not load is reported, and the UI shows why."""
    import dagster as dg

    from pipelines.partitions import build_partitions, sync_partitions

    try:
        with dg.DagsterInstance.from_config(str(home)) as inst:
            for req in sync_partitions(build_partitions(configs_dir()), inst):
                verb = "added" if isinstance(req, dg.AddDynamicPartitionsRequest) else "removed"
                print(f"{req.partitions_def_name} partitions {verb}: {', '.join(req.partition_keys)}")
    except Exception as err:  # a broken YAML file: the code location will say so in the UI too
        print(f"partitions not brought in step with configs/: {err}", file=sys.stderr)


def cmd_ui(args) -> int:
    workspace = PROJECT_ROOT / "workspace.yaml"
    if not workspace.is_file():
        raise UserError(
            f"{workspace} does not exist; the Dagster definitions are not set up in this checkout"
        )
    home = dagster_home()  # the same instance that `fusemix demo` runs in
    _sync_partitions(home)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    argv = [_tool("dagster"), "dev", "-w", str(workspace), "-h", args.host, "-p", str(args.port)]
    print(f"Dagster UI: http://{args.host}:{args.port}  (DAGSTER_HOME={home})", flush=True)
    return serve(argv, env, grace_s=args.grace, after=lambda: _cancel_ui_runs(home))


def cmd_mlflow_ui(args) -> int:
    from pipelines.tracking import default_tracking_uri

    uri = default_tracking_uri(create=True)
    argv = [_tool("mlflow"), "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI: http://{args.host}:{args.port}  (store {uri})", flush=True)
    return serve(argv, dict(os.environ), grace_s=args.grace)


# Host names a page may use for a server bound to loopback; any other (a DNS-rebinding page) is refused.
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _listen(host: str, port: int):
    """A socket bound to host:port, or a UserError that says why not (the port is taken ...)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port"
        ) from err
    return sock


def cmd_serve(args) -> int:
    import uvicorn

    from app.web import create_app
    from fusion.media import MediaLimits
    from pipelines.lake import Lake
    from pipelines.search import Searcher

    root, models = _lake_root(args), fusemix_home() / "models"
    max_upload = int(args.max_upload_mb * 1024 * 1024)
    app = create_app(
        # Uploads are decoded under the project's media limits, with the server's size limit.
        Searcher(Lake(root), models, limits=MediaLimits(max_bytes=max_upload)),
        max_upload_bytes=max_upload,
        allowed_hosts=list(_LOOPBACK_HOSTS) if args.host in _LOOPBACK_HOSTS else None,
    )
    sock = _listen(args.host, args.port)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"FuseMix search: http://{shown}:{args.port}  (lake {root}, models {models})", flush=True)
    config = uvicorn.Config(
        app, log_level="info", timeout_graceful_shutdown=max(1, round(args.grace)), server_header=False
    )
    # uvicorn stops on SIGINT/SIGTERM, then raises the signal again: Ctrl-C ends in main's
    # KeyboardInterrupt (status 130), SIGTERM in the default action. Where the re-raised signal meets
    # a handler that does not raise (a library may have installed one), the server has still stopped
    # because of a signal: that is an interruption too, never a clean exit.
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if server.should_exit:
        raise KeyboardInterrupt
    return 0


def cmd_demo(args) -> int:
    from app.demo import run_demo

    return int(run_demo(family=args.family))


def cmd_materialize(args) -> int:
    from app.demo import materialize

    return int(materialize(args.stage, args.partition))


# ---------------------------------------------------------------------------------------------
# Parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"port must be at most 65535, got {value}")
    return value


def _positive_mb(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number of MiB, got {text!r}") from err
    if not 0 < value <= 1024:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1024 MiB, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusemix",
        description="FuseMix: data-efficient multimodal fusion as a Dagster pipeline over Lance, MLflow and DuckDB.",
    )
    parser.add_argument(
        "--lake",
        help="Lance lake root, a folder or s3://bucket/prefix (default: $FUSEMIX_LAKE, else <FUSEMIX_HOME>/lance)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="default-corpus sources").add_subparsers(
        dest="data_cmd", required=True
    )
    p = data.add_parser("list", help="list the sources")
    p.set_defaults(func=cmd_data_list)
    p = data.add_parser("fetch", help="fetch a source into the data cache and print its report")
    p.add_argument("name")
    p.add_argument("--limit", type=_positive_int, help="keep this many concepts")
    p.add_argument("--seed", type=int, default=0, help="seed of the concept choice and the splits")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_data_fetch)

    enc = sub.add_parser("encoder", help="the encoder registry").add_subparsers(
        dest="encoder_cmd", required=True
    )
    p = enc.add_parser("list", help="registered encoders and whether they can be built here")
    p.add_argument("--max-width", type=int, default=60, help="cut cells longer than this (0: never)")
    p.set_defaults(func=cmd_encoder_list)
    p = enc.add_parser("add", help="add or replace an encoder in configs/encoders.yaml")
    p.add_argument("name")
    p.add_argument("--modality", required=True, choices=("image", "text", "audio"))
    p.add_argument("--source", required=True, choices=("hf", "offline", "laion_clap"))
    p.add_argument("--model", required=True, help="hub id, local folder or offline-pack key")
    p.add_argument("--pooling", choices=("mean", "cls", "pooler"))
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an entry of options (value read as YAML), e.g. checkpoint=/path/630k-audioset-best.pt",
    )
    p.set_defaults(func=cmd_encoder_add)

    p = sub.add_parser("sql", help="query the lake with DuckDB")
    p.add_argument("query", nargs="?", help="one SQL statement")
    p.add_argument("--saved", metavar="NAME", help="run configs/queries/NAME.sql")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="saved-query parameter")
    p.add_argument("--list", action="store_true", help="list the saved queries")
    p.add_argument("--csv", action="store_true", help="write CSV (every row, cells uncut)")
    p.add_argument("--max-width", type=int, default=40, help="cut cells longer than this (0: never)")
    p.add_argument("--max-rows", type=int, default=100, help="print at most this many rows (0: all)")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser(
        "compare", help="paired bootstrap: one experiment's Recall@k against others' on the same test queries"
    )
    p.add_argument("reference", help="the experiment whose lead is measured")
    p.add_argument("others", nargs="+", metavar="OTHER", help="experiments to compare it with")
    p.add_argument("-k", type=_positive_int, default=1, help="Recall@k (default 1)")
    p.add_argument("--resamples", type=_positive_int, default=10_000, help="bootstrap resamples")
    p.add_argument("--plot", metavar="PNG", help="also draw the differences and intervals into this file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "search", help="search a trained experiment's space by text, image or audio (its embeddings asset)"
    )
    p.add_argument("query", nargs="?", help="a text query (or give --image or --audio)")
    p.add_argument("--experiment", required=True)
    p.add_argument("--image", metavar="PATH", help="query by this image file")
    p.add_argument("--audio", metavar="PATH", help="query by this sound file")
    p.add_argument(
        "--target",
        choices=("image", "audio", "text"),
        help="the side to search (default: the media side for a text query, text for a file)",
    )
    p.add_argument("--dataset", help="search only this dataset's items")
    p.add_argument("-k", type=_positive_int, default=5, help="how many results")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ui", help="run the Dagster UI (dagster dev)")
    p.add_argument("--port", type=_port, default=3000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--grace", type=float, default=5.0, help="seconds for an orderly stop before the rest is killed"
    )
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("mlflow-ui", help="run the MLflow UI")
    p.add_argument("--port", type=_port, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--grace", type=float, default=5.0, help="seconds for an orderly stop before the rest is killed"
    )
    p.set_defaults(func=cmd_mlflow_ui)

    p = sub.add_parser("serve", help="the search page and its JSON API (app.web)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--max-upload-mb", type=_positive_mb, default=16.0, help="largest query file accepted")
    p.add_argument(
        "--grace", type=float, default=5.0, help="seconds for running requests to finish on Ctrl-C"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the end-to-end demo: ingest, extract, train and evaluate a family")
    p.add_argument("--family", default="demo", help="experiment family of configs/experiments.yaml to run")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("materialize", help="materialise one stage's assets, or all")
    # app.demo validates the stage: the CLI does not keep a second list that could drift.
    p.add_argument("stage", metavar="STAGE", help="ingest, extract, experiment or all")
    p.add_argument("--partition", metavar="KEY", help="partition key (default: every partition)")
    p.set_defaults(func=cmd_materialize)
    return parser


# User errors that library code raises: shown as one line, never as a traceback. Looked up in
# sys.modules so that `fusemix --help` does not import torch, DuckDB or Lance: an error class whose
# module was never imported cannot have been raised.
_USER_ERROR_CLASSES = {
    "pipelines.catalog": ("CatalogError",),
    "pipelines.search": ("SearchError",),
    "fusion.encoders.base": ("EncoderConfigError", "EncoderUnavailable"),
}


def disk_error_message(err: BaseException, args: argparse.Namespace | None = None) -> str | None:
    """One line for a write that a full or read-only disk refused (pipelines.storage), naming the
    folder: the one the error names, else the lake (a Lance error) or FUSEMIX_HOME. None otherwise."""
    from pipelines.storage import StorageError, storage_error

    found = storage_error(err)
    if found is None:
        return None
    if found.path is None:
        from pipelines.lake import default_lake_root

        lance = "LanceError" in str(err)
        where = (getattr(args, "lake", None) or default_lake_root()) if lance else fusemix_home()
        found = StorageError(found.errno, where, found.detail)
    return str(found)


def _is_user_error(err: BaseException) -> bool:
    kinds: list[type] = [UserError, LookupError, FileNotFoundError]
    if (cli := sys.modules.get("app.cli")) is not None:  # under `python -m app.cli` this module is __main__
        kinds.append(cli.UserError)
    for module, names in _USER_ERROR_CLASSES.items():
        if (mod := sys.modules.get(module)) is not None:
            kinds += [getattr(mod, n) for n in names]
    return isinstance(err, tuple(kinds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on bad usage: return its status instead
        return int(exc.code or 0)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if _is_user_error(err):
            msg = str(err.args[0]) if isinstance(err, LookupError) and err.args else str(err)
        elif (disk := disk_error_message(err, args)) is not None:
            msg = disk  # a full or read-only disk: which folder and what to do, not a traceback
        else:
            raise  # a bug: keep the traceback
        print(f"fusemix: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusemix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
