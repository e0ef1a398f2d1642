"""Checks on an untrusted ``.npz`` file before numpy reads any array of it.

``np.load`` believes an array's header: a 1 KB file that declares a shape of
a terabyte makes it try to allocate a terabyte (``MemoryError``), and smaller
claims really are allocated. A text file renamed to ``.npz`` gets numpy's
advice to "load it with allow_pickle", the wrong advice for a CSV.
:func:`npz_problem` reads only the zip directory and each member's ``.npy``
header and says what is wrong, so :mod:`fnnet.data` and
:mod:`fnnet.checkpoint` can refuse the file with their own error, naming it.

Pure Python and numpy.
"""

from __future__ import annotations

import math
import os
import zipfile

import numpy as np

#: How much a deflate stream can expand (zlib's limit is about 1032:1).
MAX_DEFLATE_RATIO = 1032
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def npz_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a sound ``.npz`` archive, or None if it is.

    Checks, without reading any array data: the zip signature, then for every
    ``.npy`` member its header (format version, dtype, shape) and that the
    bytes the header declares fit in the member, and that the member's size
    fits in the file (allowing for the most deflate can expand).

    Args:
      path: the file.

    Returns:
      None, or one sentence naming the problem (without the path).

    Raises:
      OSError: the file cannot be read.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(_ZIP_MAGIC):
        if head.startswith(_NPY_MAGIC):
            return "a single .npy array, not an .npz archive"
        if not head:
            return "the file is empty"
        if _looks_like_text(head):
            return (
                f"it is a text file (it starts with {head[:40]!r}); a CSV file "
                "needs the .csv extension"
            )
        return f"no zip signature (it starts with {head[:16]!r})"
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                problem = _member_problem(archive, info, size)
                if problem is not None:
                    return problem
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        return f"corrupt or truncated ({e})"
    return None


def _member_problem(archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int):
    name = info.filename
    if info.compress_size > size:
        return (
            f"member {name!r} claims {info.compress_size} bytes in a {size}-byte file"
        )
    limit = info.compress_size
    if info.compress_type != zipfile.ZIP_STORED:
        limit = MAX_DEFLATE_RATIO * info.compress_size + 1024
    if info.file_size > limit:
        return (
            f"member {name!r} claims {info.file_size} bytes but its "
            f"{info.compress_size} stored bytes cannot hold that many"
        )
    if not name.endswith(".npy"):
        return None
    with archive.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return f"member {name!r} has .npy format version {version}"
        except (ValueError, TypeError, SyntaxError, EOFError) as e:
            return f"member {name!r} has a damaged .npy header: {e}"
        offset = f.tell()
    if dtype.hasobject:
        return None  # refused by allow_pickle=False when read, with its message
    declared = math.prod(shape) * dtype.itemsize
    if offset + declared > info.file_size:
        return (
            f"member {name!r} declares shape {tuple(shape)} of {dtype} "
            f"({declared} bytes) but holds only {info.file_size - offset} bytes "
            "(damaged or crafted file)"
        )
    return None
