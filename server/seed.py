"""A new default registry starts with the heads headserve ships, so an installed server is useful at once.

In a checkout the default registry is the committed `registry/`. An installed server cannot write
inside site-packages, so its default registry is `./registry` in the working directory, which does
not exist on the first start: it is created then as a copy of the shipped heads (`math`,
`math-linear`), and never touched again. A registry named explicitly (`--heads-dir`,
`HEADSERVE_HEADS_DIR`) is the user's choice and is left as it is.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

from heads.base import SHIPPED_HEADS
from server.settings import Settings

log = logging.getLogger(__name__)


def seed_default_registry(settings: Settings, shipped: Path = SHIPPED_HEADS) -> list[str]:
    """Create the default registry as a copy of `shipped` if it does not exist yet; the heads copied.

    The copy is made in a hidden folder beside it and renamed into place, so a crash or a second server
    starting at the same moment never leaves a registry with half a head in it.
    """
    root = settings.heads_dir
    if "heads_dir" in settings.model_fields_set or root.exists() or not shipped.is_dir():
        return []
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.seed-{uuid.uuid4().hex[:12]}"
    try:
        shutil.copytree(shipped, staging, ignore=shutil.ignore_patterns(".*", "__pycache__"))
        staging.rename(root)
    except OSError:
        if root.is_dir():  # another process seeded it first: theirs stands
            return []
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    log.info("created the registry %s with the heads headserve ships: %s", root, ", ".join(names))
    return names
