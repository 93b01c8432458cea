"""Astronomy helpers shared by the API and the ingester (vectorised where it matters)."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

# ICRS (J2000) -> Galactic rotation matrix (Hipparcos definition, as used by astropy)
_ICRS_TO_GAL = np.array(
    [
        [-0.0548755604162154, -0.8734370902348850, -0.4838350155487132],
        [+0.4941094278755837, -0.4448296299600112, +0.7469822444972189],
        [-0.8676661490190047, -0.1980763734312015, +0.4559837761750669],
    ]
)
_OBLIQUITY_J2000 = math.radians(23.4392911)
_EQ_TO_ECL = np.array(
    [
        [1.0, 0.0, 0.0],
        [0.0, math.cos(_OBLIQUITY_J2000), math.sin(_OBLIQUITY_J2000)],
        [0.0, -math.sin(_OBLIQUITY_J2000), math.cos(_OBLIQUITY_J2000)],
    ]
)

RADIUS_TO_RAD = {
    "arcsec": math.pi / 180 / 3600,
    "arcmin": math.pi / 180 / 60,
    "deg": math.pi / 180,
    "rad": 1.0,
}


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    ra_r, dec_r = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r), np.sin(dec_r)])


def _angles(vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lon = np.degrees(np.arctan2(vec[1], vec[0])) % 360.0
    lat = np.degrees(np.arcsin(np.clip(vec[2], -1.0, 1.0)))
    return lon, lat


def radec_to_galactic(ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
    return _angles(_ICRS_TO_GAL @ _unit_vectors(np.asarray(ra, float), np.asarray(dec, float)))


def radec_to_ecliptic(ra: Any, dec: Any) -> tuple[np.ndarray, np.ndarray]:
    return _angles(_EQ_TO_ECL @ _unit_vectors(np.asarray(ra, float), np.asarray(dec, float)))


def deg_to_hms(ra: float) -> str:
    """RA in degrees -> 'HH:MM:SS.ssss'."""
    total = (ra % 360.0) / 15.0 * 3600.0
    total = round(total, 4)
    if total >= 86400.0:
        total -= 86400.0
    hours, rem = divmod(total, 3600.0)
    minutes, seconds = divmod(rem, 60.0)
    return f"{int(hours):02d}:{int(minutes):02d}:{seconds:07.4f}"


def deg_to_dms(dec: float) -> str:
    """Dec in degrees -> 'DD:MM:SS.sss' (a minus sign only; no plus, as upstream)."""
    sign = "-" if dec < 0 else ""
    total = round(abs(dec) * 3600.0, 3)
    degrees, rem = divmod(total, 3600.0)
    minutes, seconds = divmod(rem, 60.0)
    return f"{sign}{int(degrees):02d}:{int(minutes):02d}:{seconds:06.3f}"


def geojson_point(ra: float, dec: float) -> dict[str, Any]:
    """GeoJSON Point for a 2dsphere index: longitude = ra - 180."""
    return {"type": "Point", "coordinates": [float(ra) - 180.0, float(dec)]}


def coordinates_block(ra: float, dec: float) -> dict[str, Any]:
    """The `coordinates` sub-document stored with every alert/catalog row."""
    gal_l, gal_b = radec_to_galactic(ra, dec)
    ecl_lon, ecl_lat = radec_to_ecliptic(ra, dec)
    return {
        "radec_str": [deg_to_hms(ra), deg_to_dms(dec)],
        "radec_geojson": geojson_point(ra, dec),
        "l": float(gal_l),
        "b": float(gal_b),
        "geocentricmeanecliptic": {"lambda": float(ecl_lon), "beta": float(ecl_lat)},
    }


_SEXAGESIMAL = re.compile(
    r"^\s*([+-])?\s*(\d+(?:\.\d*)?)\s*[:hHdD\s]\s*(\d+(?:\.\d*)?)\s*[:mM'\s]\s*(\d+(?:\.\d*)?)\s*[sS\"]?\s*$"
)


def _parse_sexagesimal(value: str) -> tuple[float, bool]:
    match = _SEXAGESIMAL.match(value)
    if not match:
        raise ValueError(f"cannot parse coordinate {value!r}")
    sign, a, b, c = match.groups()
    magnitude = float(a) + float(b) / 60.0 + float(c) / 3600.0
    return (-magnitude if sign == "-" else magnitude), sign is not None


def parse_ra(value: Any) -> float:
    """RA in degrees from a number or 'HH:MM:SS.s' / 'HHhMMmSS.ss'; checked to be in [0, 360)."""
    if isinstance(value, str) and re.search(r"[:hHmMsS ]", value.strip()):
        hours, _ = _parse_sexagesimal(value)
        ra = hours * 15.0
    else:
        ra = _as_float(value, "ra")
    if not 0.0 <= ra < 360.0:
        raise ValueError(f"ra {ra} out of range [0, 360)")
    return ra


def parse_dec(value: Any) -> float:
    """Dec in degrees from a number or '±DD:MM:SS.s' / 'DDdMMmSS.s'; checked to be in [-90, 90]."""
    if isinstance(value, str) and re.search(r"[:dDmMsS ]", value.strip()):
        dec, _ = _parse_sexagesimal(value)
    else:
        dec = _as_float(value, "dec")
    if not -90.0 <= dec <= 90.0:
        raise ValueError(f"dec {dec} out of range [-90, 90]")
    return dec


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or sexagesimal string, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def great_circle_distance(ra1: Any, dec1: Any, ra2: Any, dec2: Any) -> np.ndarray:
    """Angular distance in degrees (haversine; inputs in degrees, broadcastable)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(x, float)) for x in (ra1, dec1, ra2, dec2))
    hav = (
        np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    )
    distance: np.ndarray = np.degrees(2 * np.arcsin(np.sqrt(np.clip(hav, 0.0, 1.0))))
    return distance


def coordinates_problem(ra: Any, dec: Any) -> str | None:
    """Why (ra, dec) is not a sky position in degrees, or None."""
    if not (isinstance(ra, int | float) and isinstance(dec, int | float)):
        return f"no coordinates (ra={ra}, dec={dec})"
    if not (math.isfinite(ra) and math.isfinite(dec)):
        return f"coordinates not finite (ra={ra}, dec={dec})"
    if not (0.0 <= ra <= 360.0 and -90.0 <= dec <= 90.0):
        return f"coordinates out of range (ra={ra}, dec={dec})"
    return None


def cone_clause(ra: float, dec: float, radius_rad: float) -> dict[str, Any]:
    """The 2dsphere $geoWithin/$centerSphere clause on `coordinates.radec_geojson`."""
    return {
        "coordinates.radec_geojson": {
            "$geoWithin": {"$centerSphere": [[ra - 180.0, dec], radius_rad]}
        }
    }
