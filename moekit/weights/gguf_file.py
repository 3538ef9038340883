"""Reading a GGUF file safely: gguf-py's memory-mapped reader, with a truncated or damaged file
reported as a one-line :class:`CheckpointError` naming the file and the tensor or key.

Used by the model import (:mod:`moekit.weights.gguf_import`) and the tokenizer
(:mod:`moekit.weights.gguf_tokenizer`). Nothing in a file is executed: gguf-py parses the
header and key/value section with numpy and maps the tensor data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moekit.weights.io import CheckpointError


def open_gguf(path: str | Path):
    """gguf-py's reader over ``path`` (memory-mapped), or a CheckpointError naming the file."""
    from gguf import GGUFReader

    class Reader(GGUFReader):
        def _build_tensors(self, start_offs, fields):  # a truncated file: name the first tensor cut off
            size = self.data.nbytes
            for field in fields:
                _, name, _, dims, kind, offset = field.parts
                name = bytes(name).decode("utf-8", "replace")
                block, nbytes = _block(kind[0], name)
                n = math.prod(int(d) for d in dims)
                end = start_offs + int(offset[0]) + n // block * nbytes
                if end > size:
                    raise ValueError(f"tensor {name!r} ends at byte {end:,}, past the end of the file "
                                     f"({size:,} bytes): the file is truncated")
            super()._build_tensors(start_offs, fields)

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return Reader(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError) as e:  # how gguf-py meets damage
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _block(kind: int, name: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(int(kind))]
    except (ValueError, KeyError):
        raise ValueError(f"tensor {name!r} has unknown GGML type {int(kind)}") from None


class Metadata:
    """The key/value part of a GGUF file, read on demand; errors name the file and key."""

    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, TypeError) as e:  # undecodable bytes, a damaged array
            raise CheckpointError(f"{self.path}: metadata key {key!r} cannot be read ({e})") from None

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def count(self, key: str, default=None) -> int | None:
        """A non-negative integer key (a size or a count)."""
        v = self.get(key, default) if default is not None else self.need(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CheckpointError(f"{self.path}: metadata key {key!r}={v!r} must be a non-negative integer")
        return v

    def real(self, key: str, default: float | None = None) -> float | None:
        """A float32 key as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
        v = self.get(key)
        return default if v is None else float(str(np.float32(v)))
