"""Atomic file output: write to a hidden temp file beside the target, then rename over it.

A crash or an exception never leaves a half-written file at the target path, and an existing
target is refused unless the caller allows overwriting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from hsam.errors import OutputError, OutputExistsError

logger = logging.getLogger(__name__)


def refuse_existing(paths: Iterable[str | os.PathLike]) -> None:
    """Raise :class:`~hsam.errors.OutputExistsError` for the first of ``paths`` that exists."""
    for p in map(Path, paths):
        if p.exists() or p.is_symlink():
            raise OutputExistsError(
                f"{p} already exists; choose another output path, delete it, or pass "
                "overwrite=True (--overwrite on the command line)"
            )


def check_writable_folder(folder: str | os.PathLike, what: str = "output") -> None:
    """Raise :class:`~hsam.errors.OutputError` unless files can be created in ``folder``.

    ``folder`` need not exist: its nearest existing ancestor must be a folder this user may
    write into (``os.access``, which also reports read-only file systems). Called before any
    compute, so an unwritable ``--out`` fails at once instead of after the work."""
    folder = Path(folder)
    probe = folder
    while not (probe.exists() or probe.is_symlink()):
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is" if probe == folder else f"lies under {probe}, which is"
        raise OutputError(
            f"{what} {folder} {where} a file, not a folder; choose another output path."
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write {what} {folder}: {probe} is not writable by this user (read-only "
            "folder or file system); choose another output path or fix its permissions."
        )


def stale_temp_files(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Temp files :func:`atomic_output` left in ``folder`` for targets ``names`` when the
    process was killed mid-write (``.<name>.<8 random chars>.tmp[suffix]``, plain files only):
    the exact pattern it creates, so nothing the user wrote matches."""
    folder = Path(folder)
    patterns = [
        re.compile(rf"\.{re.escape(n)}\.[A-Za-z0-9_]{{8}}\.tmp(\.[A-Za-z0-9.]+)?") for n in names
    ]
    if not folder.is_dir():
        return []
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and not f.is_symlink() and any(p.fullmatch(f.name) for p in patterns)
    )


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname())[:32] or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def make_staging_dir(parent: str | os.PathLike, kind: str) -> Path:
    """A new hidden folder ``.hsam-<kind>-<host>-<pid>-<random>`` in ``parent`` where outputs
    are written before they are moved into place; it names its writer, so a later call can
    recognise one left by a killed process (:func:`remove_stale_staging_dirs`)."""
    prefix = f".hsam-{kind}-{_host_tag()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def remove_stale_staging_dirs(parent: str | os.PathLike, kind: str) -> list[Path]:
    """Remove staging folders of `kind` in `parent` whose writer, on this host, is no longer
    running (a kill between staging and the move); returns them. Only folders named exactly
    as :func:`make_staging_dir` names them and holding plain files only are touched."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    pattern = re.compile(
        rf"\.hsam-{re.escape(kind)}-{re.escape(_host_tag())}-(\d+)-[A-Za-z0-9_]{{8}}"
    )
    removed = []
    for folder in parent.iterdir():
        match = pattern.fullmatch(folder.name)
        if not match or folder.is_symlink() or not folder.is_dir():
            continue
        if _process_alive(int(match.group(1))):
            continue
        if any(f.is_symlink() or not f.is_file() for f in folder.iterdir()):
            continue  # not what hsam stages: leave it
        shutil.rmtree(folder)
        removed.append(folder)
    if removed:
        logger.info(
            "removed %d staging folder(s) left by interrupted runs in %s", len(removed), parent
        )
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike,
    *,
    overwrite: bool = True,
    suffix: str = "",
    companions: Iterable[Path] = (),
) -> Iterator[Path]:
    """Yield a temp path to write ``path`` atomically.

    The temp file is hidden, in the destination folder, and ends with ``suffix`` (writers that
    pick the format from the extension need it). On normal exit it is moved onto ``path``; on
    an exception it is deleted and nothing appears at ``path``. When the writer also creates
    ``companions`` (e.g. a MetaImage ``.mhd``'s data file), a hidden temp folder is used and
    every file in it is moved, the main file last.

    Raises:
        OutputExistsError: a target exists and not ``overwrite`` (checked on entry and again
            just before the move).
    """
    path = Path(path)
    targets = [path, *companions]
    if not overwrite:
        refuse_existing(targets)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~_umask()
    if targets[1:]:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmpdir / path.name
            if not overwrite:
                refuse_existing(targets)
            written = sorted(tmpdir.iterdir(), key=lambda f: f.name == path.name)
            for f in written:
                os.replace(f, path.parent / f.name)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not overwrite:
            refuse_existing(targets)
        os.chmod(tmp, mode)  # mkstemp creates 0600; follow the umask like a normal write
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (fsync before the rename)."""
    path = Path(path)
    with atomic_output(path, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write UTF-8 ``text`` with ``\\n`` line ends to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
