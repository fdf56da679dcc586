"""Write an export folder completely or not at all.

Files go to a temporary folder beside the target; only when everything is written is it renamed
into place. An existing non-empty target is refused unless `overwrite=True`, in which case the old
folder is replaced only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

from fastlora_jax.errors import ExportError


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """Yield a temporary folder to fill; rename it to `target` when the block succeeds."""
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
        raise ExportError(f"cannot write to {str(parent)!r} ({err.strerror}); choose a writable "
                          f"folder") from None
    try:
        yield tmp
        if target.exists():
            old = parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"writing {str(target)!r} failed ({err}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
