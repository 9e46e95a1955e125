"""Reading a user's text file for training, with a typed error for every way it can be unusable.

A path the user names may be empty, binary (an archive, a model file, random bytes), not UTF-8, a folder,
missing, or it may change under the reader (deleted, replaced or rewritten by another program while it is
read). :func:`read_text_file` reads the file in chunks from one open descriptor and checks, after the last
chunk, that the path still names the same file with the same size and modification time as when it was
opened; anything else raises :class:`~moesaic.core.errors.DataError` naming the field and the file, before
any training step (so no checkpoint is written from half a file).

Each chunk passes the fault point ``data.read`` (:mod:`moesaic.train.faults`), where the chaos harness
deletes or truncates the file mid-read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from moesaic.core.errors import DataError
from moesaic.train.faults import fault_point

#: Bytes per read; the fault point ``data.read`` runs after each.
CHUNK = 1 << 20


def _err(field: str, path: Path, rule: str) -> DataError:
    return DataError(f"{field} = '{path}': {rule}")


def read_text_file(path: str | Path, field: str = "data.files") -> str:
    """The UTF-8 text of ``path``; :class:`DataError` when it is missing, not a regular file, empty, binary,
    not UTF-8, or was deleted, replaced or changed while it was read."""
    p = Path(path).expanduser()
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        raise _err(field, p, "no such file") from None
    except OSError as e:
        raise _err(field, p, f"cannot be read ({e.strerror or e})") from None
    chunks: list[bytes] = []
    n = 0
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise _err(field, p, "is not a regular file")
        while True:
            try:
                b = os.read(fd, CHUNK)
            except OSError as e:
                raise _err(field, p, f"read failed after {n} bytes ({e.strerror or e})") from None
            if not b:
                break
            chunks.append(b)
            n += len(b)
            fault_point("data.read", offset=n)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        now = os.stat(p)
    except OSError:
        raise _err(field, p, f"vanished while being read ({n} of {before.st_size} bytes read)") from None
    if after.st_nlink == 0 or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
        raise _err(field, p, "was deleted or replaced while being read")
    if n != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise _err(field, p, f"changed while being read ({before.st_size} bytes at open, {n} read, "
                             f"{after.st_size} now)")
    data = b"".join(chunks)
    if not data.strip():
        raise _err(field, p, "is empty" if not data else "holds only whitespace")
    nul = data.find(b"\0")
    if nul >= 0:
        raise _err(field, p, f"holds NUL bytes (the first at offset {nul}): binary data, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(field, p, f"is not UTF-8 text (invalid byte at offset {e.start}); binary data, or convert it "
                             "with iconv -t utf-8") from None
