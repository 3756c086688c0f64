"""Typed errors for head files and bases, so callers (the server, the CLIs) can map them to answers.

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


class BaseModelError(Exception):
    """Base class: a base model that cannot be loaded or run as asked (not a head's fault)."""


class UnsupportedBaseError(BaseModelError):
    """The engine has no ragged runner for the base's architecture (`config.model_type`), or the runner
    cannot honour one of the base's options (say, sliding-window attention); the message names it."""


class BaseNotFoundError(BaseModelError, FileNotFoundError):
    """HEADSERVE_BASE_MODEL or --base names a local folder or .gguf file that is not there."""


class BaseDependencyError(BaseModelError):
    """The base needs a package that is not installed (an alias's package, or what converts a GGUF); the
    message says what to install."""
