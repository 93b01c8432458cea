"""Serve the API with gunicorn using the configured workers, limits and address:
`python -m api` (what the container runs)."""

from __future__ import annotations

import os
import sys

from kowalski.config import ConfigError, check_secrets, load_config_or_exit
from kowalski.services.api import gunicorn_command, metrics_directory


def main() -> None:
    cfg = load_config_or_exit()
    try:
        check_secrets(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    # gunicorn replaces this process, so the directory lasts as long as the server
    cmd = gunicorn_command(
        cfg, cfg.server.host, cfg.server.port, metrics_directory(cfg.server.port)
    )
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
