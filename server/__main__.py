"""`python -m server`: serve the API with uvicorn; flags override the HEADSERVE_* environment."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from pydantic import ValidationError

from heads.base_sources import base_names_help
from server.app import create_app
from server.seed import seed_default_registry
from server.settings import Settings, get_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    parser.add_argument("--host", help="interface to bind (HEADSERVE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (HEADSERVE_PORT, default 8000)")
    parser.add_argument("--base-model", help=f"{base_names_help()} (HEADSERVE_BASE_MODEL; a GGUF is converted "
                        "once into HEADSERVE_CACHE_DIR)")
    parser.add_argument("--heads-dir", help="the head registry folder (HEADSERVE_HEADS_DIR, default: the checkout's "
                        "registry/; installed, ./registry, created with the shipped heads)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port),
                                               ("base_model", args.base_model), ("heads_dir", args.heads_dir))
                 if value is not None}
    # Constructor arguments take precedence over the environment in pydantic-settings.
    try:
        settings = Settings(**overrides) if overrides else get_settings()
    except ValidationError as e:  # refuse to start, one line per bad setting, instead of failing requests later
        for err in e.errors():
            name = ".".join(str(part) for part in err["loc"])
            where = f"HEADSERVE_{name.upper()}: " if name else ""
            print(f"invalid setting {where}{err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    seed_default_registry(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
