"""headserve: one frozen GPT-2, small trained output heads swapped per request.

This package is the distribution's front door: the version every part of the project reports
(`pyproject.toml` reads it from here) and the `headserve` command (`headserve.cli`). The code lives
in the sibling packages `heads`, `server`, `training`, `clients` and `bench`; a wheel also carries
the embedded base and the committed heads here, under `headserve/models` and `headserve/registry`.
It imports nothing heavy, so `headserve --version` answers without loading torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
