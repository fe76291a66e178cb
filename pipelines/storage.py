"""Full and read-only disks as one clear error: `StorageError` says which folder, what happened and
what to do, wherever the failed write came from.

Python raises OSError with `errno` set (ENOSPC, EDQUOT, EROFS, EACCES, EPERM); Lance raises OSError
without an errno and with the system's words and number in the message ("No space left on device
(os error 28)"); SQLite (MLflow, Dagster's instance) says "database or disk is full" or "attempt to
write a readonly database". `disk_errno` recognises all of them, along an exception's causes too.

    with writing(lake.root, "the Lance lake"):   # a disk error inside -> StorageError naming the lake
        write_dataset(lake, name, ds)
    check_writable(home / "dagster", "DAGSTER_HOME")   # StorageError if nothing can be written there

What a failed write leaves stays readable: Lance makes a new version current only once all its files
are written, so the previous version of every table is still the current one (a table whose very first
write failed has no manifest, and `Lake.tables()` skips it), and `fusemix sql` keeps working.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# errno -> (what happened, what to do), for the errors a write meets on a full or read-only disk.
_FULL = (
    "free space on that disk, or point FUSEMIX_HOME (or --lake) at a disk with room, and run it again; "
    "what was written before stays readable (fusemix sql)"
)
_READ_ONLY = (
    "make it writable for this user, or point FUSEMIX_HOME (or --lake) at a writable folder; "
    "reading it still works (fusemix sql)"
)
DISK_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", _FULL),
    errno.EDQUOT: ("the disk quota is exceeded", _FULL),
    errno.EROFS: ("the file system is read-only", _READ_ONLY),
    errno.EACCES: ("permission denied", _READ_ONLY),
    errno.EPERM: ("operation not permitted", _READ_ONLY),
}
# What the message of an error without an errno says (Lance, SQLite, an error re-raised as text).
_OS_ERROR_NUMBER = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
_PHRASES = (
    ("no space left on device", errno.ENOSPC),
    ("disk quota exceeded", errno.EDQUOT),
    ("database or disk is full", errno.ENOSPC),
    ("read-only file system", errno.EROFS),
    ("attempt to write a readonly database", errno.EROFS),
    ("permission denied", errno.EACCES),
)
# Where a message names the file: Lance's `at path "..."`, Python's `[Errno 28] ...: '/the/file'`.
_PATH_IN_TEXT = re.compile(r'at path "([^"]+)"|\[Errno \d+\][^:\n]*: \'([^\'\n]+)\'')
# The metadata key that marks a Dagster failure as a full or read-only disk (`dagster_failure`).
FAILURE_KEY = "fusemix/storage_error"


class StorageError(Exception):
    """A write that a full or read-only disk refused. `errno`: the system's error number; `path`: the
    folder (or file) that could not be written. Its message is one line that says what to do."""

    def __init__(self, code: int, path: str | os.PathLike | None, detail: str = "") -> None:
        self.errno = code
        self.path = str(path) if path is not None else None
        self.detail = detail
        what, todo = DISK_ERRORS.get(code, (os.strerror(code), _READ_ONLY))
        where = f"cannot write to {self.path}" if self.path else "cannot write"
        super().__init__(f"{where}: {what} ({errno.errorcode.get(code, code)}); {todo}")

    def __reduce__(self):  # picklable across Dagster's process boundaries
        return (StorageError, (self.errno, self.path, self.detail))


def errno_in_text(text: str) -> int | None:
    """The disk error number a message names ("(os error 28)", "[Errno 30]", or the words), else None."""
    for match in _OS_ERROR_NUMBER.finditer(text):
        code = int(match.group(1) or match.group(2))
        if code in DISK_ERRORS:
            return code
    lower = text.lower()
    for phrase, code in _PHRASES:
        if phrase in lower:
            return code
    return None


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen and len(seen) < 16:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_errno(err: BaseException) -> int | None:
    """The number of the full- or read-only-disk error `err` is (or was caused by), else None."""
    for e in _chain(err):
        if isinstance(e, StorageError):
            return e.errno
        code = getattr(e, "errno", None) if isinstance(e, OSError) else None
        if code in DISK_ERRORS:
            return code
        if code is None and (found := errno_in_text(str(e))) is not None:
            return found
    return None


def storage_error(err: BaseException, path: str | os.PathLike | None = None) -> StorageError | None:
    """`err` as a StorageError when it is a full or read-only disk, else None. The path is `path` (the
    folder the caller was writing), else the file the error names."""
    for e in _chain(err):
        if isinstance(e, StorageError):
            return e
    code = disk_errno(err)
    if code is None:
        return None
    named = None
    for e in _chain(err):
        if isinstance(e, OSError) and e.filename:
            named = os.fsdecode(e.filename)
            break
        if match := _PATH_IN_TEXT.search(str(e)):
            named = match.group(1) or match.group(2)
            break
    return StorageError(
        code, path if path is not None else named, str(err).splitlines()[0] if str(err) else ""
    )


def storage_error_in_text(
    text: str, path: str | os.PathLike | None = None, codes: Iterable[int] | None = None
) -> StorageError | None:
    """A StorageError from an error's text alone (an error that crossed a process boundary as text,
    such as a Dagster step's), naming the file the text names, else `path`; None if it is no disk error
    (or not one of `codes`)."""
    code = errno_in_text(text)
    if code is None or (codes is not None and code not in set(codes)):
        return None
    match = _PATH_IN_TEXT.search(text)
    named = (match.group(1) or match.group(2)) if match else None
    return StorageError(code, named or path, text.strip().splitlines()[-1] if text.strip() else "")


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turns a full- or read-only-disk error raised inside into a StorageError about `path`."""
    try:
        yield
    except Exception as err:
        found = storage_error(err, path)
        if found is None or found is err:
            raise
        raise found from err


@contextmanager
def dagster_failure() -> Iterator[None]:
    """In an asset: a StorageError raised inside becomes a dagster.Failure whose description is its
    one line (no retry: the disk needs a person), marked with FAILURE_KEY in its metadata."""
    try:
        yield
    except StorageError as err:
        import dagster as dg  # only assets call this; the command line imports this module without it

        metadata = {FAILURE_KEY: errno.errorcode.get(err.errno, str(err.errno)), "path": err.path or ""}
        raise dg.Failure(description=str(err), metadata=metadata, allow_retries=False) from err


def check_writable(folder: str | os.PathLike) -> Path:
    """Creates `folder` if needed and writes (and removes) a small file there; raises StorageError if
    the disk is read-only, full or not ours. Runs before anything that must write there starts."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fusemix-write-check-", dir=path)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        found = storage_error(err, path)
        if found is None:
            raise
        raise found from err
    return path
