"""`python -m ingester.skyportal status`: the feed's outbox and set-up, per survey."""

from __future__ import annotations

import sys

from ingester.skyportal.stage import main

if __name__ == "__main__":
    sys.exit(main())
