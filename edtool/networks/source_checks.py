"""What every model source checks and records: image sizes within bounds, whole numbers, the hash of the
files a model came from, and a foreign exception told in one line."""

import hashlib
import math
import numbers
from pathlib import Path
from typing import List

from edtool.errors import EdtoolError

MAX_IMAGE_ENTRIES = 2**24  # C x H x W of the images a model may ask for (3 x 2048 x 2048 is 12.6 million)


def describe_exception(e: BaseException) -> str:
    """`Type: first words of its message` in one line."""
    text = " ".join(str(e).split())[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def files_hash(root: Path, files: List[Path]) -> str:
    """sha256 over the files' paths relative to root and their contents: what a resume must match."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def check_image_size(shape: tuple, where: str) -> None:
    """Refuse images larger than MAX_IMAGE_ENTRIES (the store and the noise are sized by them)."""
    if math.prod(shape) > MAX_IMAGE_ENTRIES:
        raise EdtoolError(f"{where}: images of shape {list(shape)} have more than {MAX_IMAGE_ENTRIES:,} entries, "
                          "more than edtool measures")
