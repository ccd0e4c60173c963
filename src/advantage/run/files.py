"""Writing files whole or not at all: the one helper every writer of the package uses.

A file is written under a temporary name in its own directory and renamed onto its target only once complete; a
rename within one file system is atomic, so a reader, a crash or a full disk never leaves a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def usual_permissions(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file or directory made by tempfile (0600 / 0700) the permissions a plain open() or mkdir() would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends, removed if it raises.

    Args:
        suffix: the temporary name's ending (a writer that picks its format from the name, such as matplotlib's
            savefig, needs the target's own, e.g. ".tmp.png").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        usual_permissions(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a whole text file (UTF-8) or nothing, flushed to disk before the rename."""
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
