"""The DuckDB catalog over the Lance lake: every Lance table as a SQL view, plus union views across datasets.

    cat = Catalog(default_lake_root())                               # pipelines.lake
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
A view whose tables do not exist yet has the columns of pipelines.schemas and no rows, so saved
queries run (and return no rows) on a fresh lake. A bare table named like a union view (`media`, one
table for every dataset) is registered as `media__table` and joins the `media` view.

DuckDB scans a registered `lance.LanceDataset` through its pyarrow-dataset interface, pushing the
projection and simple filters down into Lance (`SELECT count(*) FROM latents_meta` never reads a
vector), so nothing is materialised up front.

Saved queries are `configs/queries/NAME.sql` (or $FUSEMIX_CONFIGS/queries): one statement, with
DuckDB named parameters `$name`; a header line `-- @param name = default` declares each parameter.

`Catalog.sql` and `Catalog.saved` are read-only: one SELECT (or EXPLAIN) statement, run on a
connection whose external access (files, ATTACH, COPY, extensions, the network) is disabled and whose
configuration is locked before the query is parsed, so the lake is changed by the pipeline only.
`Catalog.connect()` gives the library a writable connection (e.g. for tables of your own in a
`database` file).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import duckdb
import pyarrow as pa

from fusion.paths import configs_dir
from pipelines import schemas
from pipelines.lake import Lake, sql_str
from pipelines.schemas import parse_table_name

# Union views and the table kind (pipelines.schemas) each gathers.
_UNIONS = {
    "media": "media",
    "pairs": "pairs",
    "quarantine": "quarantine",
    "latents_meta": "latents",
    "latents": "latents",
    "curated": "curated",
}

_PARAM_DECL = re.compile(r"^--\s*@param\s+([A-Za-z_]\w*)\s*(?:=\s*(.*?))?\s*$")
_PARAM_USE = re.compile(r"(?<![\w$])\$([A-Za-z_]\w*)")
_QUERY_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class CatalogError(ValueError):
    """A query, saved query or parameter the catalog cannot run; the message says why."""


# Run on every read-only connection after the lake's views exist; lock_configuration comes last, so
# no later SET can undo the others.
_READ_ONLY = (
    "SET enable_external_access = false",
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET lock_configuration = true",
)
_READ_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


def check_read_only(query: str) -> None:
    """Raises CatalogError unless `query` is exactly one SELECT (incl. WITH, FROM, DESCRIBE, SHOW,
    SUMMARIZE) or EXPLAIN statement."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise CatalogError(f"query failed: {err}") from err
    if len(statements) != 1:
        raise CatalogError(f"give exactly one SQL statement; this query has {len(statements)}")
    kind = statements[0].type
    if kind not in _READ_STATEMENTS:
        raise CatalogError(
            f"the SQL surface is read-only: {kind.name} statements are refused (only SELECT and "
            "EXPLAIN); the lake is written by the pipeline's assets"
        )


def queries_dir() -> Path:
    """The saved queries: <configs>/queries (configs/ or $FUSEMIX_CONFIGS)."""
    return configs_dir() / "queries"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
        f"{sql_str(v) if isinstance(v, str) else int(v)} AS {quote_ident(k)}" for k, v in constants.items()
    ]
    cols = [quote_ident(n) for n in schema.names if n not in constants and n not in drop]
    return f"SELECT {', '.join(consts + cols + list(extra))} FROM {quote_ident(table)}"


def _kind_selects(alias: str, schema: pa.Schema, kind: str, parts: tuple[str, ...]) -> dict[str, str]:
    """view -> the SELECT that adds table `alias` (of pipeline table kind `kind`) to that union view."""
    if kind in ("media", "pairs", "quarantine"):
        return {kind: _select_with(alias, schema, {} if "dataset" in schema.names else {"dataset": parts[0]})}
    if kind == "curated":
        return {"curated": _select_with(alias, schema, {"experiment": parts[0]})}
    if kind != "latents":
        return {}
    vec = schema.field("vector").type if "vector" in schema.names else None
    dim = vec.list_size if vec is not None and pa.types.is_fixed_size_list(vec) else -1
    consts = {"dataset": parts[0], "encoder": parts[1], "dim": dim}
    out = {"latents_meta": _select_with(alias, schema, consts, drop=("vector",))}
    if vec is not None:
        # FLOAT[] rather than FLOAT[d]: encoders of different dimensions share one view.
        out["latents"] = _select_with(
            alias, schema, consts, drop=("vector",), extra=['"vector"::FLOAT[] AS "vector"']
        )
    return out


class Catalog:
    """DuckDB views over the Lance tables of one lake. `database`: a DuckDB file for the user's own
    tables (default: in memory); the lake views are always temporary, so the file never holds stale
    references to Lance versions."""

    def __init__(
        self,
        lake_root: str | os.PathLike | Lake,
        database: str | None = None,
        tables: Iterable[str] | None = None,
    ) -> None:
        self.lake = lake_root if isinstance(lake_root, Lake) else Lake(lake_root)
        self.database = database
        # Only these tables (default: every table the lake lists, local or on an object store).
        self._tables = list(tables) if tables is not None else None

    def tables(self) -> list[str]:
        return list(self._tables) if self._tables is not None else self.lake.tables()

    def connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        """A new connection with a view per Lance table and the union views (see the module docstring);
        `read_only`: no file, network or extension access and a locked configuration."""
        con = duckdb.connect(self.database or ":memory:")
        try:
            self._register(con)
            if read_only:
                for setting in _READ_ONLY:
                    con.execute(setting)
        except Exception:
            con.close()
            raise
        return con

    def _register(self, con: duckdb.DuckDBPyConnection) -> None:
        unions: dict[str, list[str]] = {view: [] for view in _UNIONS}
        tables = self.tables()
        for name in tables:
            ds = self.lake.open(name)
            if name in unions:
                # A bare table named like a union view (one table for all datasets) joins that
                # view under another name rather than being hidden by it.
                alias = f"{name}__table"
                con.register(alias, ds)
                unions[name].append(_select_with(alias, ds.schema, {}))
                continue
            con.register(name, ds)
            parsed = parse_table_name(name)
            if parsed is not None:
                for view, select in _kind_selects(name, ds.schema, *parsed).items():
                    unions[view].append(select)
        for view, selects in unions.items():
            if not selects:
                # No table of this kind yet: an empty stand-in of the schema the pipeline writes, so
                # the view has every documented column on a fresh lake.
                kind = _UNIONS[view]
                alias = f"_empty_{kind}"
                schema = schemas.KINDS[kind][1] or schemas.latents(1)
                con.register(alias, schema.empty_table())
                selects = [_kind_selects(alias, schema, kind, ("", ""))[view]]
            union = "\nUNION ALL BY NAME\n".join(selects)
            con.execute(f"CREATE OR REPLACE TEMP VIEW {quote_ident(view)} AS {union}")
        if "metrics" not in tables:
            con.register("metrics", schemas.METRICS.empty_table())

    def sql(self, query: str, params: dict | None = None) -> pa.Table:
        """Runs one read-only query (check_read_only) on a fresh locked-down connection (the current
        Lance versions) -> pyarrow.Table."""
        check_read_only(query)
        con = self.connect(read_only=True)
        try:
            try:
                result = con.sql(query, params=params) if params else con.sql(query)
            except duckdb.Error as err:
                raise CatalogError(f"query failed: {err}") from err
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
