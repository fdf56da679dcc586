"""Write files and folders completely or not at all.

- `atomic_folder(target)`: files go to a temporary folder beside the target, are flushed to disk,
  and only when everything is written does the folder take the target's name. An existing
  non-empty target is refused unless `overwrite=True`; then the complete new folder and the old
  one swap names in one step (Linux `renameat2(RENAME_EXCHANGE)`), so at every moment the target
  holds either the old folder or the new one, never neither, and the old one is deleted after.
  Where the OS or filesystem cannot exchange (not Linux, or a filesystem without the call) the
  old folder is renamed aside first, leaving a moment without the target; its name is logged.
- `atomic_file(path)`: the same for one file (write aside, fsync, `os.replace`).

A failure while writing (a full disk, a file-size limit, an unwritable folder) removes the
temporary copy and raises one `ExportError` that names the target and the OS's reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import pathlib
import shutil
import sys
import tempfile
from typing import IO, Iterator

from safetensors import SafetensorError

from fastlora_jax.errors import ExportError

log = logging.getLogger(__name__)

RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100
# What a failed write raises: the OS's errors, and safetensors' wrapper around them.
WRITE_ERRORS = (OSError, SafetensorError)


def exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap the names of two existing paths in one step; False where the OS cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)  # a C symbol: absent on old glibc / musl
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(folder: pathlib.Path) -> None:
    """Flush every file under `folder`, then the folders themselves, to disk."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(pathlib.Path(root))


def _fsync_dir(folder: pathlib.Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    return str(err)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary folder to fill; it becomes `target` when the block succeeds."""
    target = pathlib.Path(target)
    if target.exists() and not target.is_dir():
        raise ExportError(f"export target {str(target)!r} is a file; give a folder path")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ExportError(f"export target {str(target)!r} is not empty; choose another folder or "
                          f"pass overwrite=True to replace it")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=parent))
    except OSError as err:
        raise ExportError(f"cannot write to {str(parent)!r} ({_describe(err)}); choose a writable "
                          f"folder") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        _install(tmp, target)
        _fsync_dir(parent)
    except WRITE_ERRORS as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"writing {str(target)!r} failed ({_describe(err)}); nothing was "
                          f"written" + (f" and {str(target)!r} is unchanged" if target.exists()
                                        else "") + ". Free disk space or raise the file-size "
                          f"limit, then run again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _install(tmp: pathlib.Path, target: pathlib.Path) -> None:
    """Give the complete folder `tmp` the name `target` (see the module doc)."""
    if not target.exists():
        tmp.rename(target)
        return
    if exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    log.warning("this filesystem cannot swap folders in one step: %s is moved to %s while the "
                "new one takes its place", target, old)
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Yield a file handle beside `path`; on success it replaces `path` in one rename."""
    path = pathlib.Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    except OSError as err:
        raise ExportError(f"cannot write {str(path)!r} ({_describe(err)})") from None
    tmp = pathlib.Path(name)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except WRITE_ERRORS as err:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"writing {str(path)!r} failed ({_describe(err)}); the previous "
                          f"version, if any, is unchanged") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` by `text` in one step (see `atomic_file`)."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
