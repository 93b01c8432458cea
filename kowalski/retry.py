"""The one backoff rule for every retry loop: exponential, capped, with jitter (half the delay
fixed, half random), so that many ingesters retrying one failed server do not come back in step."""

from __future__ import annotations

import random


def backoff(attempt: int, base: float, cap: float = float("inf")) -> float:
    """Seconds to wait before attempt `attempt + 1`, where `attempt` (1, 2, ...) just failed:
    `base * 2**(attempt - 1)`, capped at `cap`, jittered into [d/2, d]."""
    delay = min(cap, base * 2.0 ** max(0, attempt - 1))
    return delay / 2 + random.uniform(0, delay / 2)
