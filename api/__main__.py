"""Serve the API with gunicorn using the configured workers, limits and address:
`python -m api` (what the container runs)."""

from __future__ import annotations

import os
import sys

from kowalski.config import ConfigError, load_config
from kowalski.services.api import gunicorn_command


def main() -> None:
    try:
        cfg = load_config()
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    cmd = gunicorn_command(cfg, cfg.server.host, cfg.server.port)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
