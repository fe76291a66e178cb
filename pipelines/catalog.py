"""The DuckDB catalog over the Lance lake: every Lance table as a SQL view, plus union views across datasets.

    cat = Catalog(default_lake_root())
    cat.sql("SELECT dataset, count(*) FROM pairs GROUP BY ALL")     # -> pyarrow.Table
    cat.saved("best_runs", metric="t2i_recall_at_1")               # configs/queries/best_runs.sql

Views (one connection sees the Lance versions that were current when it was opened):
    <table>        one per Lance table of the lake, same name (quote names holding '-' or '.')
    media          media__*            + `dataset`
    pairs          pairs__*            + `dataset`
    quarantine     quarantine__*       (`dataset` is a column of the tables; added where missing)
    latents_meta   latents__*__*       + `dataset`, `encoder`, `dim`, without the vector (cheap)
    latents        latents__*__*       as latents_meta plus `vector` as FLOAT[] (encoders differ in dim)
    curated        curated__*          + `experiment`
    metrics        the metrics table
A union view whose tables do not exist yet is an empty view with the documented columns, so saved
queries run (and return no rows) on a fresh lake. A bare table named like a union view (`media`, one
table for every dataset) is registered as `media__table` and joins the `media` view.

DuckDB scans a registered `lance.LanceDataset` through its pyarrow-dataset interface, pushing the
projection and simple filters down into Lance (`SELECT count(*) FROM latents_meta` never reads a
vector), so nothing is materialised up front.

Saved queries are `configs/queries/NAME.sql` (or $FUSEMIX_CONFIGS/queries): one statement, with
DuckDB named parameters `$name`; a header line `-- @param name = default` declares each parameter.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import duckdb
import pyarrow as pa

from fusion.paths import configs_dir, fusemix_home
from pipelines.lake import Lake

# Columns of the union views when no table of that kind exists yet (the schemas the assets write).
_EMPTY = {
    "media": "dataset VARCHAR, media_id VARCHAR, modality VARCHAR, path VARCHAR, data BLOB, text VARCHAR, "
    "source VARCHAR, license VARCHAR, size_bytes BIGINT",
    "pairs": "dataset VARCHAR, pair_id VARCHAR, media_id VARCHAR, caption_id VARCHAR, raw_caption_id VARCHAR, "
    "split VARCHAR, group_id VARCHAR, concept VARCHAR, source VARCHAR, license VARCHAR, quality DOUBLE",
    "quarantine": "dataset VARCHAR, source VARCHAR, item VARCHAR, reason VARCHAR, detail VARCHAR",
    "latents_meta": "dataset VARCHAR, encoder VARCHAR, dim INTEGER, media_id VARCHAR, fingerprint VARCHAR",
    "latents": "dataset VARCHAR, encoder VARCHAR, dim INTEGER, media_id VARCHAR, fingerprint VARCHAR, "
    "vector FLOAT[]",
    "curated": "experiment VARCHAR, pair_id VARCHAR",
    "metrics": "experiment VARCHAR, dataset VARCHAR, split VARCHAR, metric VARCHAR, value DOUBLE, "
    "mlflow_run_id VARCHAR, created_at TIMESTAMP, fingerprint_media VARCHAR, fingerprint_text VARCHAR",
}

_PARAM_DECL = re.compile(r"^--\s*@param\s+([A-Za-z_]\w*)\s*(?:=\s*(.*?))?\s*$")
_PARAM_USE = re.compile(r"(?<![\w$])\$([A-Za-z_]\w*)")
_QUERY_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class CatalogError(ValueError):
    """A query, saved query or parameter the catalog cannot run; the message says why."""


def default_lake_root() -> str:
    """Where the Lance tables live: <FUSEMIX_HOME>/lance (as pipelines.resources, without importing dagster)."""
    return str(fusemix_home() / "lance")


def queries_dir() -> Path:
    """The saved queries: <configs>/queries (configs/ or $FUSEMIX_CONFIGS)."""
    return configs_dir() / "queries"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _arrow(result: duckdb.DuckDBPyRelation | duckdb.DuckDBPyConnection) -> pa.Table:
    # DuckDB >= 1.4 names it to_arrow_table; older versions only have fetch_arrow_table.
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    return fetch()


def _select_with(
    table: str,
    schema: pa.Schema,
    constants: dict[str, str | int],
    drop: Iterable[str] = (),
    extra: Iterable[str] = (),
) -> str:
    """SELECT <constants>, <table columns except those and `drop`>, <extra expressions> FROM table."""
    drop = set(drop)
    consts = [
        f"{quote_literal(v) if isinstance(v, str) else int(v)} AS {quote_ident(k)}"
        for k, v in constants.items()
    ]
    cols = [quote_ident(n) for n in schema.names if n not in constants and n not in drop]
    return f"SELECT {', '.join(consts + cols + list(extra))} FROM {quote_ident(table)}"


def _union(selects: list[str], empty: str) -> str:
    if not selects:
        return _empty_select(empty)
    return "\nUNION ALL BY NAME\n".join(selects)


def _empty_select(columns: str) -> str:
    """A zero-row SELECT with the given 'name TYPE, ...' columns."""
    parts = []
    for col in columns.split(","):
        name, typ = col.strip().split(" ", 1)
        parts.append(f"CAST(NULL AS {typ}) AS {quote_ident(name)}")
    return f"SELECT {', '.join(parts)} WHERE false"


class Catalog:
    """DuckDB views over the Lance tables of one lake. `database`: a DuckDB file for the user's own
    tables (default: in memory); the lake views are always temporary, so the file never holds stale
    references to Lance versions."""

    def __init__(
        self, lake_root: str | os.PathLike, database: str | None = None, tables: Iterable[str] | None = None
    ) -> None:
        self.lake = Lake(lake_root)
        self.database = database
        # Object-store lakes cannot be listed here: name their tables explicitly.
        self._tables = list(tables) if tables is not None else None

    def tables(self) -> list[str]:
        return list(self._tables) if self._tables is not None else self.lake.tables()

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A new connection with a view per Lance table and the union views (see the module docstring)."""
        con = duckdb.connect(self.database or ":memory:")
        try:
            self._register(con)
        except Exception:
            con.close()
            raise
        return con

    def _register(self, con: duckdb.DuckDBPyConnection) -> None:
        unions: dict[str, list[str]] = {k: [] for k in _EMPTY if k != "metrics"}
        has_metrics = False
        for name in self.tables():
            ds = self.lake.open(name)
            schema = ds.schema
            parts = name.split("__")
            kind = parts[0]
            if name in unions:
                # A bare table named like a union view (one table for all datasets) joins that
                # view under another name rather than being hidden by it.
                alias = f"{name}__table"
                con.register(alias, ds)
                unions[name].append(_select_with(alias, schema, {}))
                continue
            con.register(name, ds)
            if name == "metrics":
                has_metrics = True
            elif kind in ("media", "pairs", "quarantine") and len(parts) == 2:
                consts = {} if "dataset" in schema.names else {"dataset": parts[1]}
                unions[kind].append(_select_with(name, schema, consts))
            elif kind == "curated" and len(parts) == 2:
                unions["curated"].append(_select_with(name, schema, {"experiment": parts[1]}))
            elif kind == "latents" and len(parts) == 3:
                vec = schema.field("vector").type if "vector" in schema.names else None
                dim = vec.list_size if vec is not None and pa.types.is_fixed_size_list(vec) else -1
                consts = {"dataset": parts[1], "encoder": parts[2], "dim": dim}
                unions["latents_meta"].append(_select_with(name, schema, consts, drop=("vector",)))
                if vec is not None:
                    # FLOAT[] rather than FLOAT[d]: encoders of different dimensions share one view.
                    as_list = ['"vector"::FLOAT[] AS "vector"']
                    unions["latents"].append(
                        _select_with(name, schema, consts, drop=("vector",), extra=as_list)
                    )
        for view, selects in unions.items():
            con.execute(f"CREATE OR REPLACE TEMP VIEW {quote_ident(view)} AS {_union(selects, _EMPTY[view])}")
        if not has_metrics:
            con.execute(f"CREATE OR REPLACE TEMP VIEW metrics AS {_empty_select(_EMPTY['metrics'])}")

    def sql(self, query: str, params: dict | None = None) -> pa.Table:
        """Runs one query on a fresh connection (the current Lance versions) -> pyarrow.Table."""
        con = self.connect()
        try:
            try:
                result = con.sql(query, params=params) if params else con.sql(query)
            except duckdb.Error as err:
                raise CatalogError(f"query failed: {err}") from err
            if result is None:  # a statement without a result (CREATE, SET ...)
                return pa.table({})
            return _arrow(result)
        finally:
            con.close()

    def saved(self, name: str, **params: object) -> pa.Table:
        """Runs configs/queries/NAME.sql with its parameters (declared defaults filled in)."""
        query, declared = load_saved_query(name)
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise CatalogError(
                f"saved query {name!r} has no parameter(s) {unknown}; it takes {sorted(declared) or 'none'}"
            )
        values = {**declared, **params}
        missing = sorted(k for k, v in values.items() if v is None)
        if missing:
            raise CatalogError(f"saved query {name!r} needs parameter(s) {missing}")
        return self.sql(query, values or None)


def saved_queries() -> list[str]:
    """Names of the saved queries (configs/queries/*.sql)."""
    return sorted(p.stem for p in queries_dir().glob("*.sql"))


def load_saved_query(name: str) -> tuple[str, dict[str, str | None]]:
    """(SQL text, {parameter: default or None}) of configs/queries/NAME.sql.

    Every `$param` the SQL uses must be declared with `-- @param name [= default]`, so a typo in a
    query file fails here with its name rather than as a DuckDB binder error.
    """
    if not _QUERY_NAME.match(name):
        raise CatalogError(f"invalid saved query name {name!r}: letters, digits, '_' and '-' only")
    path = queries_dir() / f"{name}.sql"
    if not path.is_file():
        raise CatalogError(f"no saved query {name!r} (looked for {path}); available: {saved_queries()}")
    text = path.read_text(encoding="utf-8")
    declared: dict[str, str | None] = {}
    for line in text.splitlines():
        m = _PARAM_DECL.match(line.strip())
        if m:
            default = m.group(2)
            if (
                default is not None
                and len(default) >= 2
                and default[0] == default[-1]
                and default[0] in "'\""
            ):
                default = default[1:-1]
            declared[m.group(1)] = default if default != "" else None
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    used = set(_PARAM_USE.findall(body))
    undeclared = sorted(used - set(declared))
    if undeclared:
        raise CatalogError(f"{path}: parameter(s) {undeclared} are used but not declared with '-- @param'")
    # DuckDB refuses values for parameters a statement does not use: keep only the used ones.
    return text, {k: v for k, v in declared.items() if k in used}
