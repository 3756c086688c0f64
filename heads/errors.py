"""Typed errors for head files, so callers (the server, the CLIs) can map them to answers.

Every message names the file or field at fault; the server shows it to clients as is.
"""


class HeadError(Exception):
    """Base class: anything wrong with a head or its files."""


class HeadFormatError(HeadError):
    """The folder, config or tensors are malformed, missing, mis-shaped or non-finite."""


class UnknownHeadTypeError(HeadFormatError):
    """`head_type` names no registered head kind."""


class BaseMismatchError(HeadError):
    """The head was trained on a different base model than the one it is loaded against."""
