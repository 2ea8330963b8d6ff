"""What the tools read and write on disk: regular files only, and names from data files made safe to
use as path parts. Everything a tool writes lands under a folder the user named (docs/DESIGN.md §9)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

from crformer.errors import UserError, first_line


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path if it is an existing regular file (a FIFO or a device would block or never end
    on read); otherwise a UserError naming it."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except OSError:
        raise UserError(f"{what} not found: {p}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} {p} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {p} is not a regular file")
    return p


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def path_part(name: str, limit: int = 80) -> str:
    """``name`` (a split name, a sentence...) as one harmless file-name part: no separators, no
    leading dots (so never ``..``), at most ``limit`` characters; never empty."""
    part = _UNSAFE.sub("_", str(name)).lstrip(".")[:limit]
    return part or "_"


#: Temp files of :func:`atomic_write` are ``.<name>.<8 random characters>.tmp`` beside the target.
TEMP_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (0666 less the umask); mkstemp gives 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_failure(e: BaseException, folder: Path) -> str:
    if isinstance(e, OSError):
        return "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    try:
        vfs = os.statvfs(folder)
        where = f"; {vfs.f_bavail * vfs.f_frsize / 2**20:.0f} MiB free in {folder}"
    except OSError:
        where = ""
    return f"the write failed ({first_line(e)}{where})"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, what: str) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` only when the block ends without error:
    written to a temp file in the same folder, fsynced, then renamed, so a kill mid-write leaves the
    previous file intact, never a truncated one. A full disk, an unwritable folder or a target that is
    not a regular file is a UserError naming ``what`` and ``path`` (the previous file stays as it
    was). A RuntimeError in the block counts as a failed write too: torch's zip writer reports
    ENOSPC, EFBIG or EIO that way ("unexpected pos ...")."""
    path = Path(path)
    if os.path.lexists(path) and not path.is_file():
        raise UserError(f"cannot write {what} {path}: it exists and is not a regular file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            kept = f"; the previous {path.name} is intact" if path.exists() else ""
            raise UserError(f"cannot write {what} {path}: {_write_failure(e, path.parent)}{kept}") from None
        raise


def link_atomic(source: str | os.PathLike, path: str | os.PathLike, what: str) -> None:
    """Make ``path`` name the file ``source`` names (a hard link under a temp name, then renamed over
    ``path``), so one write serves two names; where the filesystem has no hard links, an
    :func:`atomic_write` copy. Later atomic writes of either name replace only that name."""
    source, path = Path(source), Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        with open(source, "rb") as src, atomic_write(path, what) as f:
            shutil.copyfileobj(src, f)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, what: str) -> None:
    """:func:`atomic_write` of ``data``."""
    with atomic_write(path, what) as f:
        f.write(data)


def append_line(path: str | os.PathLike, line: str, what: str) -> None:
    """Append ``line`` and a newline to ``path``; a failed write is a UserError naming ``what``."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: {_write_failure(e, Path(path).parent)}") from None


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """UserError unless ``path`` (a file, or a folder with ``folder=True``) can be written; checked
    before any work, by a probe that leaves nothing behind (``os.access`` says yes to root on a
    read-only mount)."""
    p = Path(path).expanduser()
    if p.exists() and p.is_dir() != folder:
        raise UserError(f"{what} {p} is {'a file' if folder else 'a folder'}, not {'a folder' if folder else 'a file'}")
    if not folder and p.exists() and not p.is_file():  # a device or a FIFO: writing would hang or vanish
        raise UserError(f"{what} {p} exists and is not a regular file")
    probe = p if folder and p.exists() else p.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write {what} {p}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"cannot write {what} {p}: {e.strerror or e} in {probe}") from None
    return p
