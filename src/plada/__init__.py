"""plada: send a classification dataset as a sub-megabyte payload of pool indices and labels."""

__version__ = "0.1.0"
