"""Every `fusemix` subcommand through main([...]), on real tmp lakes, registries and checkpoints."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
import types

import pytest
import yaml

import pipelines
from app import cli
from fusion.encoders import build_encoder, load_registry
from pipelines.catalog import Catalog
from pipelines.sources import SOURCES
from tests.pipelines.test_catalog import make_lake


@pytest.fixture
def home(tmp_path, monkeypatch):
    """FUSEMIX_HOME and FUSEMIX_CONFIGS in tmp_path (configs/queries copied from the project)."""
    home = tmp_path / "home"
    configs = tmp_path / "configs"
    shutil.copytree(cli.PROJECT_ROOT / "configs" / "queries", configs / "queries")
    monkeypatch.setenv("FUSEMIX_HOME", str(home))
    monkeypatch.setenv("FUSEMIX_CONFIGS", str(configs))
    return home


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_and_usage_errors(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "sql" in out and "search" in out
    rc, _, err = run(capsys)
    assert rc == 2 and "required" in err
    rc, _, err = run(capsys, "search", "a cat")
    assert rc == 2 and "--experiment" in err
    rc, _, err = run(capsys, "data", "fetch", "notes", "--limit", "0")
    assert rc == 2 and "at least 1" in err
    rc, _, err = run(capsys, "sql", "SELECT 1", "--bogus")
    assert rc == 2 and "unrecognized arguments: --bogus" in err


def test_sql_prints_an_aligned_table(home, capsys):
    make_lake(home / "lance")
    rc, out, err = run(capsys, "sql", "SELECT dataset, count(*) AS n FROM pairs GROUP BY ALL ORDER BY ALL")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["dataset", "n"]
    assert set(lines[1]) <= {"-", " "}
    assert [ln.split() for ln in lines[2:4]] == [["emoji", "6"], ["notes", "4"]]
    assert lines[-1] == "(2 rows)"
    # The numeric column is right-aligned under its header.
    assert lines[2].rstrip().endswith("6") and len(lines[2]) == len(lines[0])


def test_sql_truncates_long_cells_but_csv_does_not(home, capsys):
    lake = make_lake(home / "lance")
    query = "SELECT media_id, text FROM media WHERE text IS NOT NULL ORDER BY media_id"
    rc, out, _ = run(capsys, "--lake", lake.root, "sql", query, "--max-width", "8", "--max-rows", "3")
    assert rc == 0
    rows = out.splitlines()[2:-1]
    assert len(rows) == 3 and all(ln.split()[1] == "caption…" for ln in rows)
    assert out.splitlines()[-1] == "(10 rows, 7 not shown (--max-rows))"
    rc, out, _ = run(capsys, "sql", query, "--csv")
    assert rc == 0
    got = list(csv.DictReader(io.StringIO(out)))
    want = Catalog(lake.root).sql(query).to_pylist()
    assert got == want


def test_sql_saved_queries_and_params(home, capsys):
    make_lake(home / "lance")
    rc, out, _ = run(capsys, "sql", "--list")
    assert rc == 0 and {"best_runs", "latents_per_encoder", "quarantine_reasons"} <= set(out.split())
    rc, out, _ = run(capsys, "sql", "--saved", "best_runs", "--param", "split=val", "--csv")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["experiment"], r["value"], r["run_id"]) for r in rows] == [("emoji-none", "0.25", "run3")]
    rc, out, _ = run(capsys, "sql", "--saved", "quarantine_reasons")
    assert rc == 0 and "bad_image" in out and "silent" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (("sql",), "give a query or --saved NAME"),
        (("sql", "SELECT 1", "--saved", "best_runs"), "give a query or --saved NAME"),
        (("sql", "SELECT * FROM nowhere"), "query failed"),
        (("sql", "--saved", "nope"), "no saved query 'nope'"),
        (("sql", "--saved", "best_runs", "--param", "metric"), "KEY=VALUE"),
        (("sql", "--saved", "best_runs", "--param", "colour=red"), "no parameter(s) ['colour']"),
    ],
)
def test_sql_user_errors_exit_2_without_traceback(home, capsys, argv, message):
    make_lake(home / "lance")
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert err.startswith("fusemix: error: ") and message in err
    assert "Traceback" not in err and out == ""


def test_data_list_names_every_source(home, capsys):
    rc, out, _ = run(capsys, "data", "list")
    assert rc == 0
    assert [ln.split()[0] for ln in out.splitlines()[2:]] == sorted(SOURCES)


def test_data_fetch_unknown_source(home, capsys):
    rc, _, err = run(capsys, "data", "fetch", "nosuch")
    assert rc == 2 and "unknown source 'nosuch'" in err and "notes" in err


def test_data_fetch_notes(home, capsys, monkeypatch):
    if shutil.which("fluidsynth") is None:
        rc, _, err = run(capsys, "data", "fetch", "notes", "--limit", "1", "--quiet")
        assert rc == 2 and "fluidsynth" in err
        return
    rc, out, err = run(capsys, "data", "fetch", "notes", "--limit", "1", "--quiet")
    assert rc == 0, err
    report = dict(line.strip().split(None, 1) for line in out.splitlines()[1:3])
    assert out.startswith("dataset notes")
    assert int(report["pairs"]) > 0 and int(report["concepts"]) == 1
    assert "unique media" in out and "quarantined" in out
    assert list((home / "cache" / "data" / "notes").rglob("*.flac"))
    # Without fluidsynth the fetch says what is missing instead of a traceback.
    monkeypatch.setenv("PATH", "/nonexistent")
    shutil.rmtree(home / "cache" / "data" / "notes")
    rc, _, err = run(capsys, "data", "fetch", "notes", "--limit", "1", "--quiet")
    assert rc == 2 and "fluidsynth" in err


def test_encoder_list_and_add(home, capsys):
    configs = home.parent / "configs"
    registry = {
        "encoders": {
            "local-text": {"modality": "text", "source": "hf", "model": str(home / "no-such-folder")},
        }
    }
    (configs / "encoders.yaml").write_text(yaml.safe_dump(registry))
    rc, out, err = run(capsys, "encoder", "list")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["name", "modality", "source", "model", "available", "detail"]
    assert lines[2].split()[:3] == ["local-text", "text", "hf"]
    assert " no " in lines[2]

    rc, out, err = run(
        capsys, "encoder", "add", "bge-small", "--modality", "text", "--source", "hf",
        "--model", "BAAI/bge-small-en-v1.5", "--pooling", "cls", "--batch-size", "16",
    )  # fmt: skip
    assert rc == 0, err
    assert "sensor" in out and str(configs / "encoders.yaml") in out
    specs = load_registry(configs / "encoders.yaml")
    assert set(specs) == {"local-text", "bge-small"}
    assert (specs["bge-small"].pooling, specs["bge-small"].batch_size) == ("cls", 16)

    rc, _, err = run(
        capsys, "encoder", "add", "bad__name", "--modality", "text", "--source", "hf", "--model", "x"
    )
    assert rc == 2 and "bad__name" in err
    rc, _, err = run(capsys, "encoder", "add", "x", "--modality", "smell", "--source", "hf", "--model", "x")
    assert rc == 2 and "smell" in err
    assert set(load_registry(configs / "encoders.yaml")) == {"local-text", "bge-small"}


def test_encoder_list_without_registry_is_a_user_error(home, capsys):
    rc, _, err = run(capsys, "encoder", "list")
    assert rc == 2 and "does not exist" in err


def test_search_command(home, capsys, monkeypatch):
    from pipelines.lake import Lake
    from tests.pipelines.test_search import build_setup, embedded, write_text_registry

    configs = home.parent / "configs"
    write_text_registry(configs)
    text_encoder = build_encoder(load_registry(configs / "encoders.yaml")["tiny-text"])
    build_setup(home, text_encoder)
    rc, _, err = run(capsys, "search", "a red car", "--experiment", "toy-exp")
    assert rc == 2 and "no image embeddings yet" in err and "materialize experiment" in err
    embedded(home, Lake(home / "lance"), text_encoder)
    rc, out, err = run(capsys, "search", "a red car", "--experiment", "toy-exp", "-k", "3")
    assert rc == 0, err
    lines = [ln for ln in out.splitlines() if not ln.startswith(" " * 6)]
    assert [ln.split()[0] for ln in lines] == ["1.", "2.", "3."]
    scores = [float(ln.split()[1]) for ln in lines]
    assert scores == sorted(scores, reverse=True)
    assert "a picture of thing" in out
    rc, _, err = run(capsys, "search", "a red car", "--experiment", "missing")
    assert rc == 2 and "no trained model" in err
    # The captions themselves, by text: the exact caption first, shown with its text.
    rc, out, err = run(
        capsys, "search", "a picture of thing 4", "--experiment", "toy-exp", "--target", "text"
    )
    assert rc == 0, err
    first = out.splitlines()[0].split(maxsplit=3)
    assert first[:3] == ["1.", "+1.0000", "cap04"] and first[3] == "a picture of thing 4"


def test_search_by_image_and_audio_files(tmp_path, capsys, monkeypatch):
    from pipelines.embed import embed_space
    from pipelines.space import load_space
    from tests.pipelines.search_world import build_world

    world = build_world(tmp_path, sounds=False, variants=1)
    monkeypatch.setenv("FUSEMIX_HOME", str(world.project.home))
    monkeypatch.setenv("FUSEMIX_CONFIGS", str(world.project.configs))
    embed_space(world.lake, load_space(world.models, "shapes-pair"))
    media = world.lake.read("media__shapes", ["media_id", "modality", "path"]).to_pylist()
    picture = next(r for r in media if r["modality"] == "image" and r["path"].endswith(".png"))
    rc, out, err = run(
        capsys, "search", "--image", picture["path"], "--experiment", "shapes-pair", "--target", "image"
    )
    assert rc == 0, err
    assert out.splitlines()[0].split()[:3] == ["1.", "+1.0000", picture["media_id"]]
    # By default an image searches the captions: text items, shown with their text.
    rc, out, err = run(capsys, "search", "--image", picture["path"], "--experiment", "shapes-pair", "-k", "2")
    assert rc == 0, err
    assert len(out.splitlines()) == 2 and all(" a " in ln for ln in out.splitlines())
    for argv, message in (
        (["a cat", "--image", picture["path"]], "give one query"),
        ([], "give one query"),
        (["--audio", picture["path"]], "cannot be queried by audio"),
        (["--image", str(tmp_path / "absent.png")], "does not exist"),
        (["--image", str(world.project.data / "manifest.csv")], "a format this service does not read"),
        (["a cat", "--target", "audio"], "no side 'audio'"),
        (["a cat", "--dataset", "elsewhere"], "no image items of dataset 'elsewhere'"),
    ):
        rc, _, err = run(capsys, "search", *argv, "--experiment", "shapes-pair")
        assert rc == 2 and message in err, (argv, err)


def test_ui_commands_bind_to_localhost(home, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    calls = []
    monkeypatch.setattr(cli, "serve", lambda argv, env, grace_s, after=None: calls.append((argv, env)) or 0)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.setattr(cli, "PROJECT_ROOT", project)
    rc, _, err = run(capsys, "ui")
    assert rc == 2 and "workspace.yaml" in err and not calls
    (project / "workspace.yaml").write_text("load_from: []\n")

    rc, out, _ = run(capsys, "ui")
    assert rc == 0 and "http://127.0.0.1:3000" in out
    argv, env = calls[-1]
    assert argv[1:3] == ["dev", "-w"] and argv[3] == str(project / "workspace.yaml")
    assert argv[argv.index("-h") + 1] == "127.0.0.1" and argv[argv.index("-p") + 1] == "3000"
    assert env["DAGSTER_HOME"] == str(home / "dagster") and (home / "dagster" / "dagster.yaml").is_file()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "own-dagster"))
    assert run(capsys, "ui")[0] == 0
    assert calls[-1][1]["DAGSTER_HOME"] == str(tmp_path / "own-dagster")
    monkeypatch.delenv("DAGSTER_HOME")

    rc, out, _ = run(capsys, "ui", "--port", "3300", "--host", "0.0.0.0")
    assert rc == 0 and "http://0.0.0.0:3300" in out
    assert calls[-1][0][-4:] == ["-h", "0.0.0.0", "-p", "3300"]

    rc, out, _ = run(capsys, "mlflow-ui")
    assert rc == 0 and "http://127.0.0.1:5000" in out
    argv, _ = calls[-1]
    assert argv[1] == "ui"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5000"
    rc, _, err = run(capsys, "mlflow-ui", "--port", "70000")
    assert rc == 2 and "65535" in err


def test_demo_and_materialize_call_the_pipeline(monkeypatch, capsys):
    calls = []
    fake = types.SimpleNamespace(
        run_demo=lambda family="demo": calls.append(("demo", family)) or 0,
        materialize=lambda stage, partition: calls.append(("materialize", stage, partition)) or 3,
    )
    monkeypatch.setattr(pipelines, "demo", fake, raising=False)
    monkeypatch.setitem(sys.modules, "app.demo", fake)
    assert run(capsys, "demo")[0] == 0
    assert run(capsys, "demo", "--family", "quantity")[0] == 0
    assert run(capsys, "materialize", "extract", "--partition", "emoji|minilm")[0] == 3
    assert run(capsys, "materialize", "all")[0] == 3
    assert calls == [
        ("demo", "demo"),
        ("demo", "quantity"),
        ("materialize", "extract", "emoji|minilm"),
        ("materialize", "all", None),
    ]
    assert run(capsys, "materialize")[0] == 2


def test_format_cell():
    assert cli.format_cell(None) == ""
    assert cli.format_cell(b"\x00" * 300) == "<300 bytes>"
    assert cli.format_cell(1 / 3) == "0.333333"
    assert cli.format_cell("x" * 50, max_width=10) == "x" * 9 + "…"
    assert cli.format_cell("x" * 50, max_width=0) == "x" * 50
    assert cli.format_cell("two\nlines") == "two lines"
    assert cli.format_cell([1, 2, 3, 4, 5, 6], max_width=0) == "[1, 2, 3, 4, …] (6)"


def test_bugs_keep_their_traceback(home, capsys, monkeypatch):
    def broken(self, query, params=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Catalog, "sql", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["sql", "SELECT 1"])


def test_importing_the_cli_stays_light():
    """`fusemix --help` must not pay for torch, DuckDB, Lance or Dagster."""
    code = "import sys, app.cli; print(sorted(m for m in ('torch', 'duckdb', 'lance', 'dagster') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cli.PROJECT_ROOT, check=True
    )
    assert out.stdout.strip() == "[]"


def test_sql_output_carries_no_control_sequences_or_formulas(home, capsys):
    make_lake(home / "lance")
    query = (
        "SELECT chr(27) || '[2J' || 'cleared' AS caption, '=HYPERLINK(\"http://x\")' AS f, "
        "'@SUM(A1)' AS g, 'plain' AS h, -1.5 AS x, 'a' || chr(8238) || 'txt' AS bidi"
    )
    rc, out, _ = run(capsys, "sql", query)
    assert rc == 0
    assert "\x1b" not in out and "\u202e" not in out
    assert "\\x1b[2Jcleared" in out and "a\\u202etxt" in out
    rc, out, _ = run(capsys, "sql", query, "--csv")
    assert rc == 0 and "\x1b" not in out
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row == {
        "caption": "\\x1b[2Jcleared",
        "f": '\'=HYPERLINK("http://x")',
        "g": "'@SUM(A1)",
        "h": "plain",
        "x": "-1.5",  # numbers stay numbers
        "bidi": "a\\u202etxt",
    }


def test_sql_refuses_writes_with_a_clear_message(home, capsys):
    lake = make_lake(home / "lance")
    version = lake.open("pairs__emoji").version
    for query, message in [
        ("COPY pairs TO 'x.csv'", "read-only: COPY statements are refused"),
        ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
        ("SELECT 1; SELECT 2", "exactly one SQL statement"),
    ]:
        rc, out, err = run(capsys, "sql", query)
        assert rc == 2 and message in err and "Traceback" not in err and out == ""
    assert lake.open("pairs__emoji").version == version


def test_dagster_home_gets_the_project_instance_config_but_keeps_an_edited_one(home, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    config = cli.dagster_home() / "dagster.yaml"
    assert yaml.safe_load(config.read_text())["telemetry"] == {"enabled": False}
    config.write_text("telemetry:\n  enabled: true\n")
    cli.dagster_home()
    assert yaml.safe_load(config.read_text()) == {"telemetry": {"enabled": True}}


def _ranks(experiment: str, ranks_by_seed: dict[int, list[int]], prefix: str = "q"):
    import datetime as dt

    import pyarrow as pa

    from pipelines import schemas

    rows = [
        {"experiment": experiment, "dataset": "emoji", "split": "test", "gallery": "pooled",
         "group_name": "", "seed": seed, "direction": "t2i", "query": f"{prefix}{i}", "rank": rank,
         "inputs_hash": "h", "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)}
        for seed, ranks in ranks_by_seed.items()
        for i, rank in enumerate(ranks)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=schemas.RANKS)


def test_compare_prints_the_paired_difference_and_refuses_what_it_cannot_pair(home, capsys):
    from pipelines.lake import Lake, default_lake_root

    lake = Lake(default_lake_root())
    rc, _, err = run(capsys, "compare", "fusemix", "asif")
    assert rc == 2 and "no test ranks stored for fusemix, asif" in err
    # FuseMix: 30 of 40 queries at rank 1 on both seeds; ASIF: 10 of them. A 50-point lead.
    lake.append("ranks", _ranks("fusemix", {0: [1] * 30 + [3] * 10, 1: [1] * 30 + [2] * 10}))
    lake.append("ranks", _ranks("asif", {0: [1] * 10 + [4] * 30}))
    lake.append("ranks", _ranks("other-split", {0: [1] * 40}, prefix="x"))
    rc, out, _ = run(capsys, "compare", "fusemix", "asif", "--resamples", "500")
    assert rc == 0 and "Recall@1 of **fusemix** minus" in out
    line = next(row for row in out.splitlines() if row.startswith("| asif |"))
    assert "| emoji | pooled | t2i | 40 | 40 | **+50.0** |" in line  # no concepts: each query its own
    png = home / "diff.png"
    rc, out, _ = run(
        capsys, "compare", "fusemix", "asif", "-k", "3", "--resamples", "500", "--plot", str(png)
    )
    # At 3 every FuseMix query hits; ASIF's stay at rank 4: +75 points.
    assert "**+75.0**" in out and "Recall@3" in out
    assert f"plot: {png}" in out and png.read_bytes()[:4] == b"\x89PNG"
    rc, _, err = run(capsys, "compare", "fusemix", "other-split")
    assert rc == 2 and "share no scored test queries" in err
    rc, _, err = run(capsys, "compare", "fusemix", "missing")
    assert rc == 2 and "no test ranks stored for missing" in err
