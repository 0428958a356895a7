"""One exception type for every user-facing failure.

The CLI catches `PladaError` and prints its message on one line with a non-zero exit, so anything
a user can cause (bad path, wrong layout, corrupt payload, wrong pool) must raise this and never a
bare traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


class PladaError(Exception):
    """A failure caused by the user's input or environment, reported as one clear line."""


class PayloadError(PladaError):
    """A payload that is corrupt, truncated, hostile, or from an unsupported format version."""


class PoolMismatchError(PladaError):
    """A payload made for a different reference pool than the receiver holds."""


@contextmanager
def reading(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a failed open or read of a file the user named into one line that says which file and why."""
    try:
        yield
    except FileNotFoundError:
        raise PladaError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise PladaError(f"{what} path is a directory, not a file: {path}") from None
    except OSError as e:
        raise PladaError(f"cannot read {what} {path}: {e.strerror or ' '.join(str(e).split())}") from None
