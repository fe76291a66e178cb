"""Runs the benchmarks one after another, each under a header, and reports which ones failed.

Run: python -m benchmarks                      every bench_*.py module, quick sizes (~25 min on 2 cores)
     python -m benchmarks train retrieval      only these (names with or without the bench_ prefix)
     python -m benchmarks --full               the modules' own full-size defaults
     python -m benchmarks --list               the modules found

By default each module gets quick options (QUICK below) so the whole run stays short; --full runs
them with their own defaults (or FULL options where a module has a flag for it). A module that
fails (e.g. a source registry is unreachable) is reported and the others still run; the exit
status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Options that keep each module to a minute or two on 2 cores.
QUICK: dict[str, list[str]] = {
    "bench_train": [],
    "bench_retrieval": ["--n", "20000"],
    "bench_extract": ["--repeats", "2", "--real", "--n-image", "192", "--n-text", "512", "--n-audio", "24"],
    "bench_ingest": ["--limits", "300"],
    "bench_ingest_audio": ["--notes", "16"],
    "bench_ingest_readers": ["--rows", "500", "--repeat", "2"],
    "bench_studies": ["--steps", "10"],
    "bench_demo": [],
    "bench_precision": [],
    "bench_ray": ["--n", "192"],
    "bench_stream": ["--pairs", "200000", "--steps", "40"],
    "bench_search": [],  # the full 100,000 items: about a minute and a half
}
FULL: dict[str, list[str]] = {"bench_train": ["--full"], "bench_extract": ["--real", "--repeats", "3"]}
# (bench_stream's own defaults are the full size: 1,000,000 pairs, 6.7 GB written to a temporary folder.)


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def resolve(names: list[str]) -> list[str]:
    known = available()
    out = []
    for name in names:
        mod = name if name.startswith("bench_") else f"bench_{name}"
        if mod.endswith(".py"):
            mod = mod[:-3]
        if mod not in known:
            raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(known)}")
        out.append(mod)
    return out


def run_one(module: str, args: list[str]) -> None:
    """Imports benchmarks.<module> and calls its main(): with `args` when main takes an argv, else
    with sys.argv set to them (those modules parse sys.argv themselves)."""
    mod = importlib.import_module(f"benchmarks.{module}")
    main = getattr(mod, "main", None)
    if main is None:
        raise AttributeError(f"benchmarks.{module} has no main()")
    if inspect.signature(main).parameters:
        main(args)
        return
    saved = sys.argv
    sys.argv = [f"python -m benchmarks.{module}", *args]
    try:
        main()
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--full", action="store_true", help="full sizes (much longer)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(available()))
        return 0
    modules = resolve(args.names) if args.names else available()
    failed: list[str] = []
    total0 = time.perf_counter()
    for module in modules:
        opts = FULL.get(module, []) if args.full else QUICK.get(module, [])
        title = f" {module} {' '.join(opts)} ".rstrip() + " "
        print(f"\n{title:=^100}", flush=True)
        t0 = time.perf_counter()
        try:
            run_one(module, opts)
        except (Exception, SystemExit) as err:  # argparse exits with SystemExit; keep the others running
            if isinstance(err, SystemExit) and err.code in (0, None):
                pass
            else:
                traceback.print_exc()
                failed.append(module)
        print(f"--- {module}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\n{len(modules)} benchmarks in {time.perf_counter() - total0:.1f} s", end="")
    print(f"; FAILED: {', '.join(failed)}" if failed else "; all ran", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
