"""One exception type for every user-facing failure.

The CLI catches `PladaError` and prints its message on one line with a non-zero exit, so anything
a user can cause (bad path, wrong layout, corrupt payload, wrong pool) must raise this and never a
bare traceback.
"""


class PladaError(Exception):
    """A failure caused by the user's input or environment, reported as one clear line."""


class PayloadError(PladaError):
    """A payload that is corrupt, truncated, hostile, or from an unsupported format version."""


class PoolMismatchError(PladaError):
    """A payload made for a different reference pool than the receiver holds."""
