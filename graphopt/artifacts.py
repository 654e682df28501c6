"""Writing what the user asked for to a path they named: checked first, written atomically; folders they
name (dump_dir) checked before any work.

The artifact is written to a temporary file beside its destination and renamed into place, so a
write that fails part-way (disk full, an exporter error) leaves the previous file as it was and no
partial file behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import GraphoptError, InputError


_UMASK = os.umask(0)
os.umask(_UMASK)


def checked_path(path, what: str) -> Path:
    """`path` as a Path after checking it can take a file: an InputError says what is wrong and what to do."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{what}: give a file path, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what}: {str(path)!r} is a directory; give a file path inside it")
    parent = path.parent
    if not parent.exists():
        raise InputError(f"{what}: the folder {str(parent)!r} does not exist; create it first")
    if not parent.is_dir():
        raise InputError(f"{what}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what}: cannot write in {str(parent)!r} (permission denied)")
    return path


def writable_dir(path, what: str) -> Path:
    """`path` as a folder graphopt can write in (created if missing), or an InputError saying why not."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{what}: give a folder path, got {type(path).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{what} {str(path)!r} cannot be created ({e.strerror or e}): name a folder you can write in")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{what} {str(path)!r} is not writable: name a folder you can write in")
    return path


def write_atomically(path, what: str, write: Callable[[Path], None]) -> Path:
    """Check `path`, let `write` produce the artifact at a temporary path beside it, then rename it into place."""
    path = checked_path(path, what)
    # the suffix is kept: writers such as TVM's export_library choose the format by it
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".partial" + path.suffix, dir=path.parent)
    except OSError as e:   # a folder that exists but holds no files (/proc), a read-only mount, a full disk
        raise InputError(f"{what}: cannot create a file in {str(path.parent)!r} ({e.strerror or e}); name a path in "
                         "a folder you can write in") from e
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)      # mkstemp's 0600 is for the partial file; the artifact gets the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, GraphoptError) or not isinstance(e, Exception):
            raise
        raise GraphoptError(f"{what}: writing {str(path)!r} failed ({type(e).__name__}: {e}); "
                            "the previous file, if any, is unchanged") from e
    return path


def write_bytes_atomically(path, what: str, data: bytes) -> Path:
    return write_atomically(path, what, lambda tmp: tmp.write_bytes(data))
