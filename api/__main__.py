"""Serve the API with gunicorn using the configured workers, limits and address:
`python -m api` (what the container runs)."""

from __future__ import annotations

import os

from kowalski.config import load_config_or_exit
from kowalski.services.api import gunicorn_command


def main() -> None:
    cfg = load_config_or_exit()
    cmd = gunicorn_command(cfg, cfg.server.host, cfg.server.port)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
