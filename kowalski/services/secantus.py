"""Which embedded SecantusDB server runs, and building the Rust one (standard library only:
kowalski.py imports this before the virtual environment exists).

- `secantusd-rs` (crates.io `secantus-mdb`, pinned below): built once with `cargo install` into
  `${KOWALSKI_CACHE:-~/.cache/kowalski}/secantus-mdb-<version>` and reused; the default.
- `secantusd-py` (PyPI `secantusdb`, in requirements/test.txt): the fallback where there is no
  cargo or the build failed.

`KOWALSKI_EMBEDDED_DB=rs|py` forces one. Both are GPL-2.0-only and only ever run as separate
processes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

RS_CRATE = "secantus-mdb"
RS_VERSION = "0.5.3-beta.196"
RS_COMMAND = "secantusd-rs"
PY_COMMAND = "secantusd-py"
CHOICE_ENV = "KOWALSKI_EMBEDDED_DB"
CACHE_ENV = "KOWALSKI_CACHE"
CHOICES = ("rs", "py")
FAILED_MARKER = "build.failed"


def choice() -> str | None:
    """The forced server ('rs' or 'py'), or None to take rs when it is built."""
    value = os.environ.get(CHOICE_ENV, "").strip().lower()
    if value and value not in CHOICES:
        raise ValueError(f"{CHOICE_ENV} must be one of {', '.join(CHOICES)}, not {value!r}")
    return value or None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kowalski").expanduser()


def rs_root() -> Path:
    return cache_dir() / f"{RS_CRATE}-{RS_VERSION}"


def rs_binary() -> Path:
    return rs_root() / "bin" / RS_COMMAND


def rs_log() -> Path:
    return rs_root() / "build.log"


def find_cargo() -> str | None:
    found = shutil.which("cargo")
    if found:
        return found
    home = Path(os.environ.get("CARGO_HOME") or Path.home() / ".cargo") / "bin" / "cargo"
    return str(home) if home.exists() else None


def install_command(cargo: str) -> list[str]:
    return [
        cargo,
        "install",
        RS_CRATE,
        "--version",
        RS_VERSION,
        "--locked",
        "--ignore-rust-version",  # it declares a newer Rust than it needs
        "--root",
        str(rs_root()),
    ]


def _say(message: str) -> None:
    print(f"kowalski: {message}", file=sys.stderr, flush=True)


def _build(cargo: str, say: Callable[[str], None]) -> bool:
    say(f"building the embedded database server (first time ~10 min; log: {rs_log()})")
    with open(rs_log(), "ab") as log:
        result = subprocess.run(install_command(cargo), stdout=log, stderr=subprocess.STDOUT)
    if result.returncode == 0 and rs_binary().exists():
        return True
    (rs_root() / FAILED_MARKER).write_text(f"cargo install exited with {result.returncode}\n")
    return False


def ensure_rs(cargo: str | None = None, say: Callable[[str], None] = _say) -> Path | None:
    """The built `secantusd-rs`, building it on first use; None after a one-line notice when it
    cannot be had (no cargo, or the build failed: then it is not retried until the marker in the
    cache is removed). Several processes at once build it once (file lock)."""
    if choice() == "py":
        return None
    if rs_binary().exists():
        return rs_binary()
    cargo = cargo or find_cargo()
    fallback = f"using {PY_COMMAND} (slower)"
    if cargo is None:
        say(f"no cargo (Rust) found: {fallback}; install Rust to get {RS_COMMAND}")
        return None
    rs_root().mkdir(parents=True, exist_ok=True)
    with open(rs_root() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rs_binary().exists():
            return rs_binary()
        marker = rs_root() / FAILED_MARKER
        if marker.exists():
            say(
                f"{RS_COMMAND} did not build before (see {rs_log()}; delete {marker} to retry): {fallback}"
            )
            return None
        if not _build(cargo, say):
            say(f"building {RS_COMMAND} failed (see {rs_log()}): {fallback}")
            return None
    return rs_binary()
