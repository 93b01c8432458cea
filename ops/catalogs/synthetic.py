"""SYNTHETIC catalogs for tests and benchmarks (not real sources): uniform positions on the sphere
(or in a cone) at a given density, magnitudes from the Euclidean number counts N(<m) ∝ 10^(0.6 m)
truncated at a limiting magnitude, with photometric errors growing toward the limit."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

SQDEG_SKY = 4 * math.pi * (180 / math.pi) ** 2


def generate(
    density_per_sqdeg: float,
    center: tuple[float, float] | None = None,
    radius_deg: float | None = None,
    mag_limit: float = 21.0,
    mag_bright: float = 12.0,
    slope: float = 0.6,
    seed: int = 0,
) -> pd.DataFrame:
    """Columns: id, ra, dec, mag, mag_err, synthetic=True. All-sky unless center+radius given."""
    rng = np.random.default_rng(seed)
    if center is None or radius_deg is None:
        area = SQDEG_SKY
        n = rng.poisson(density_per_sqdeg * area)
        ra = rng.uniform(0, 360, n)
        dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    else:
        cap = 2 * math.pi * (1 - math.cos(math.radians(radius_deg))) * (180 / math.pi) ** 2
        n = rng.poisson(density_per_sqdeg * cap)
        # uniform in a spherical cap around the pole, then rotated to the center
        cos_t = rng.uniform(math.cos(math.radians(radius_deg)), 1, n)
        phi = rng.uniform(0, 2 * math.pi, n)
        sin_t = np.sqrt(1 - cos_t**2)
        vec = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t])
        ra0, dec0 = math.radians(center[0]), math.radians(center[1])
        colat = math.pi / 2 - dec0
        ry = np.array(
            [
                [math.cos(colat), 0, math.sin(colat)],
                [0, 1, 0],
                [-math.sin(colat), 0, math.cos(colat)],
            ]
        )
        rz = np.array(
            [[math.cos(ra0), -math.sin(ra0), 0], [math.sin(ra0), math.cos(ra0), 0], [0, 0, 1]]
        )
        x, y, z = rz @ ry @ vec
        ra = np.degrees(np.arctan2(y, x)) % 360
        dec = np.degrees(np.arcsin(np.clip(z, -1, 1)))
    # inverse-CDF sampling of N(<m) ∝ 10^(slope m) between mag_bright and mag_limit
    lo, hi = 10 ** (slope * mag_bright), 10 ** (slope * mag_limit)
    mag = np.log10(rng.uniform(lo, hi, n)) / slope
    mag_err = np.clip(0.01 + 0.2 * 10 ** (0.4 * (mag - mag_limit)), 0.01, 0.5)
    return pd.DataFrame(
        {
            "id": np.arange(1, n + 1),
            "ra": ra,
            "dec": dec,
            "mag": mag,
            "mag_err": mag_err,
            "synthetic": True,
        }
    )
