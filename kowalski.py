#!/usr/bin/env python3
"""Kowalski management CLI.

Runs with the system Python (standard library only at this level): commands that need the
project's packages first create `.venv`, install `requirements.txt` and the project itself
(editable: `pip install -e .`) into it, then re-run themselves inside it.

    ./kowalski.py up --local     # everything on this machine: embedded DB, Kafka, API on :4000
    ./kowalski.py test           # the whole test suite (installs what it needs)
    ./kowalski.py up|down|build  # Docker deployment (docker compose)
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import secrets
import shutil
import string
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
REQUIREMENTS = ROOT / "requirements.txt"
PYPROJECT = ROOT / "pyproject.toml"
COMPOSE_FILE = ROOT / "docker-compose.yaml"
COMPOSE_DEFAULTS = ROOT / "docker-compose.defaults.yaml"
MIN_PYTHON = (3, 11)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _requirements_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted([REQUIREMENTS, PYPROJECT, *(ROOT / "requirements").glob("*.txt")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_venv() -> None:
    """Create .venv and install the pinned requirements and the project (editable) when they
    changed (idempotent)."""
    if sys.version_info < MIN_PYTHON:
        fail(
            f"Python >= {'.'.join(map(str, MIN_PYTHON))} is required, this is {sys.version.split()[0]}"
        )
    stamp = VENV / ".requirements.sha256"
    wanted = _requirements_digest()
    if VENV_PYTHON.exists() and stamp.exists() and stamp.read_text() == wanted:
        return
    if not VENV_PYTHON.exists():
        print("creating virtual environment .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing requirements into .venv (first run takes a few minutes)", flush=True)
    pip = [str(VENV_PYTHON), "-m", "pip", "--disable-pip-version-check"]
    for cmd in (
        [*pip, "install", "-q", "--upgrade", "pip"],
        [*pip, "install", "-q", "-r", str(REQUIREMENTS)],
        [*pip, "install", "-q", "--no-deps", "-e", str(ROOT)],
    ):
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            fail("installing the Python requirements failed (see pip's output above)")
    stamp.write_text(wanted)


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def reexec_in_venv() -> None:
    """Make sure the project's packages are importable: install them and re-run inside .venv."""
    if in_venv():
        return
    ensure_venv()
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])


def ensure_embedded_server() -> None:
    """Build the embedded database server `secantusd-rs` once (pinned, cached, reused); where
    that cannot be done the runner falls back to `secantusd-py` (kowalski/services/secantus.py)."""
    if os.environ.get("MONGODB_URI"):
        return
    from kowalski.services.secantus import ensure_rs

    ensure_rs()


def git_version() -> str:
    try:
        short = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        short = ""
    return f"+git{dt.datetime.now(dt.UTC):%Y%m%d}.{short}" if short else ""


def write_version() -> str:
    from kowalski.config import load_config

    version = f"v{load_config().server.version}{git_version()}"
    (ROOT / "version.txt").write_text(version + "\n")
    return version


def ensure_keyfile() -> None:
    keyfile = ROOT / "mongo_key.yaml"
    if not keyfile.exists():
        alphabet = string.ascii_lowercase + string.digits
        keyfile.write_text("".join(secrets.choice(alphabet) for _ in range(32)))
        keyfile.chmod(0o400)


# docker compose's required secrets (docker-compose.defaults.yaml); hex digits are URL-safe, as
# MONGO_INITDB_ROOT_PASSWORD must be (it goes into MONGODB_URI)
COMPOSE_SECRETS = (
    "MONGO_INITDB_ROOT_PASSWORD",
    "KOWALSKI_JWT_SECRET_KEY",
    "KOWALSKI_ADMIN_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
)


def ensure_env_file(path: Path) -> None:
    """On first `up`/`build`: `.env` (read by docker compose, git-ignored, mode 600) with a random
    value for each required secret, so no deployment runs on a published default. An existing
    `.env` gets the secrets it lacks (added by a later version), its own values kept."""
    if path.exists():
        present = {line.split("=", 1)[0] for line in path.read_text().splitlines() if "=" in line}
        missing = [name for name in COMPOSE_SECRETS if name not in present]
        if missing:
            with path.open("a") as env:
                env.write("".join(f"{name}={secrets.token_hex(24)}\n" for name in missing))
            print(f"added random {', '.join(missing)} to {path.name}")
        return
    path.touch(mode=0o600)
    lines = [f"{name}={secrets.token_hex(24)}" for name in COMPOSE_SECRETS]
    path.write_text(
        "# docker compose's environment, created by ./kowalski.py up (random secrets; the admin\n"
        "# password logs in as server.admin_username). Variables set in the shell win.\n"
        + "\n".join(lines)
        + "\n"
    )
    print(f"created {path.name} with random {', '.join(COMPOSE_SECRETS)}")


def ensure_user_config() -> None:
    """The compose files mount config.yaml; a missing file would become a directory."""
    user = ROOT / "config.yaml"
    if not user.exists():
        user.write_text("# overrides of config.defaults.yaml (deep-merged)\nkowalski: {}\n")
        print("created an empty config.yaml (overrides of config.defaults.yaml)")


def docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if not docker:
        fail(
            "docker not found on PATH: install Docker (with the compose plugin), "
            "or run './kowalski.py up --local' for the embedded setup without Docker"
        )
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        fail("'docker compose' is not available: install the Docker compose plugin")
    ensure_user_config()
    if not COMPOSE_FILE.exists():
        shutil.copy(COMPOSE_DEFAULTS, COMPOSE_FILE)
        print(f"created {COMPOSE_FILE.name} from {COMPOSE_DEFAULTS.name}")
    return [docker, "compose", "-f", str(COMPOSE_FILE)]


def check_config() -> None:
    """Validate config.defaults.yaml + config.yaml + environment; exit with the key at fault."""
    from kowalski.config import load_config_or_exit

    load_config_or_exit()


# ---------------------------------------------------------------- commands


def cmd_up(args: argparse.Namespace) -> None:
    reexec_in_venv()
    check_config()
    if args.local:
        from ops.local import run_local

        ensure_embedded_server()
        sys.exit(run_local(replay=not args.no_replay, detach=args.detach))
    ensure_keyfile()
    ensure_env_file(ROOT / ".env")
    compose = docker_compose()
    if args.build:
        cmd_build(args)
    sys.exit(subprocess.run([*compose, "up", "-d"], cwd=ROOT).returncode)


def cmd_down(args: argparse.Namespace) -> None:
    if args.local:
        reexec_in_venv()
        from ops.local import stop_local

        sys.exit(stop_local())
    sys.exit(subprocess.run([*docker_compose(), "down"], cwd=ROOT).returncode)


def cmd_build(args: argparse.Namespace) -> None:
    reexec_in_venv()
    check_config()
    version = write_version()
    print(f"version.txt: {version}")
    ensure_keyfile()
    ensure_env_file(ROOT / ".env")
    compose = docker_compose()
    result = subprocess.run([*compose, "build"], cwd=ROOT)
    if result.returncode != 0:
        sys.exit(result.returncode)


TEST_FLAGS = {
    "--stress": "run the full suite with one CPU hog process per core (killed afterwards)",
    "--per-module": "after the full run, run each tests/test_*.py alone (same pytest options)",
}
# busy until its parent (the test command) is gone, even if that one is killed with SIGKILL
CPU_HOG = (
    "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    sum(range(100_000))\n"
)
NO_TESTS_COLLECTED = 5


def run_pytest(pytest_args: list[str]) -> int:
    return subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=ROOT).returncode


def start_cpu_hogs() -> list[subprocess.Popen[bytes]]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    hogs = [
        subprocess.Popen(
            [sys.executable, "-c", CPU_HOG],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to pytest; the hogs are ended below
        )
        for _ in range(cores or 1)
    ]
    print(f"--stress: {len(hogs)} CPU hog processes: {' '.join(str(h.pid) for h in hogs)}")
    return hogs


def stop_cpu_hogs(hogs: list[subprocess.Popen[bytes]]) -> None:
    if not hogs:
        return
    for hog in hogs:
        hog.kill()
    for hog in hogs:
        hog.wait()
    print(f"--stress: stopped {len(hogs)} CPU hog processes")


def run_full(pytest_args: list[str], stress: bool) -> int:
    hogs = start_cpu_hogs() if stress else []
    try:
        return run_pytest(pytest_args or ["tests"])
    finally:
        stop_cpu_hogs(hogs)


def is_test_path(arg: str) -> bool:
    """`tests`, `tests/test_x.py`, `tests/test_x.py::test_y` (a target, not an option)."""
    path = (ROOT / arg.split("::")[0]).resolve()
    return path.exists() and path.is_relative_to(ROOT / "tests")


def run_per_module(pytest_args: list[str]) -> int:
    """Each test module alone (found now, so new modules are included), in its own random order."""
    options = [a for a in pytest_args if not is_test_path(a)]
    failed: list[str] = []
    modules = sorted((ROOT / "tests").glob("test_*.py"))
    for module in modules:
        name = str(module.relative_to(ROOT))
        print(f"\n===== {name} alone =====", flush=True)
        if run_pytest([name, *options]) not in (0, NO_TESTS_COLLECTED):
            failed.append(name)
    print(f"\nper-module: {len(modules) - len(failed)} of {len(modules)} modules passed alone")
    for name in failed:
        print(f"per-module: FAILED alone: {name}")
    return 1 if failed else 0


def cmd_test(args: argparse.Namespace) -> None:
    reexec_in_venv()
    ensure_embedded_server()
    pytest_args = [a for a in args.pytest_args if a not in TEST_FLAGS]
    started = time.monotonic()
    code = run_full(pytest_args, stress="--stress" in args.pytest_args)
    print(f"full run: exit status {code} after {time.monotonic() - started:.0f} s", flush=True)
    if "--per-module" in args.pytest_args:
        started = time.monotonic()
        code = max(code, run_per_module(pytest_args))
        print(f"per-module runs: {time.monotonic() - started:.0f} s", flush=True)
    sys.exit(code)


def cmd_seed(args: argparse.Namespace) -> None:
    reexec_in_venv()
    check_config()
    from ops.seed import seed, seed_cells

    if args.index_cells:
        sys.exit(seed_cells(args.index_cells))
    sys.exit(seed(Path(args.source), drop=args.drop))


def cmd_feed(args: argparse.Namespace) -> None:
    reexec_in_venv()
    check_config()
    from ingester.skyportal.stage import main as feed_main

    sys.exit(feed_main([args.feed_command]))


def cmd_status(args: argparse.Namespace) -> None:
    reexec_in_venv()
    check_config()
    from kowalski.config import load_config_or_exit
    from ops.status import main as status_main

    sys.exit(status_main(load_config_or_exit()))


def cmd_backfill(args: argparse.Namespace) -> None:
    reexec_in_venv()
    check_config()
    from ingester.backfill import main as backfill_main

    if args.job:
        sys.exit(backfill_main(["run", "--job", args.job]))
    if args.filter_id is None or args.start is None or args.end is None:
        fail("give FILTER_ID --start START --end END, or --job JOB_ID")
    extra = [*(["--fid", args.fid] if args.fid else [])]
    extra += ["--max-alerts", str(args.max_alerts)] if args.max_alerts else []
    run = ["run", str(args.filter_id), "--start", args.start, "--end", args.end, *extra]
    sys.exit(backfill_main(run))


def cmd_bench(args: argparse.Namespace) -> None:
    reexec_in_venv()
    if not HELP & set(args.bench_args):
        ensure_embedded_server()
    sys.exit(subprocess.run([sys.executable, "-m", "bench", *args.bench_args], cwd=ROOT).returncode)


def cmd_develop(args: argparse.Namespace) -> None:
    reexec_in_venv()
    for cmd in (["pip", "install", "-q", "pre-commit"], ["pre-commit", "install"]):
        if subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT).returncode != 0:
            fail(f"'{' '.join(cmd)}' failed")


LINT_CHECKS = (
    ["ruff", "check", "."],
    ["ruff", "format", "--check", "."],
    ["mypy"],  # the packages and tests ([tool.mypy] files in pyproject.toml)
    ["mypy", "kowalski.py"],  # this script: a module named like the package, so checked apart
)


def cmd_lint(args: argparse.Namespace) -> None:
    reexec_in_venv()
    codes = [subprocess.run([sys.executable, "-m", *c], cwd=ROOT).returncode for c in LINT_CHECKS]
    sys.exit(max(codes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kowalski.py", description="Manage a Kowalski deployment (see README.md)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    up = sub.add_parser("up", help="start Kowalski (docker compose, or --local without Docker)")
    up.add_argument("--build", action="store_true", help="build the images first")
    up.add_argument(
        "--local",
        action="store_true",
        help="run on this machine: embedded MongoDB-compatible server, local Kafka, API on :4000",
    )
    up.add_argument(
        "--no-replay", action="store_true", help="(--local) do not replay bundled alerts"
    )
    up.add_argument("--detach", action="store_true", help="(--local) run in the background")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop Kowalski")
    down.add_argument("--local", action="store_true", help="stop a detached 'up --local'")
    down.set_defaults(func=cmd_down)

    build = sub.add_parser("build", help="write version.txt and build the Docker images")
    build.set_defaults(func=cmd_build)

    test = sub.add_parser(
        "test",
        help="run the test suite in random order (installs everything it needs)",
        description="Run the test suite (pytest, random order: replay one with --randomly-seed=N). "
        "Other arguments go to pytest.",
    )
    for flag, text in TEST_FLAGS.items():
        test.add_argument(flag, action="store_true", help=text)
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments passed to pytest")
    test.set_defaults(func=cmd_test)

    seed = sub.add_parser("seed", help="load catalogs into the configured database")
    seed.add_argument("source", nargs="?", default="data/catalogs", help="directory of catalogs")
    seed.add_argument("--drop", action="store_true", help="drop each collection before loading")
    seed.add_argument(
        "--index-cells",
        action="append",
        metavar="COLLECTION",
        help="instead of loading: add sky cells (and their index) to COLLECTION in place "
        "(repeatable)",
    )
    seed.set_defaults(func=cmd_seed)

    feed = sub.add_parser("feed", help="the SkyPortal broker feed: outbox status")
    feed.add_argument(
        "feed_command", choices=["status"], help="status: pending/failed posts per kind"
    )
    feed.set_defaults(func=cmd_feed)

    status = sub.add_parser(
        "status",
        help="one screen for a running instance: readiness, rates, lag, outbox (from its metrics)",
    )
    status.set_defaults(func=cmd_status)

    backfill = sub.add_parser(
        "backfill", help="run a filter over the archived alerts of a time range (progress bar)"
    )
    backfill.add_argument("filter_id", type=int, nargs="?")
    backfill.add_argument("--start", help="JD or ISO date (UTC)")
    backfill.add_argument("--end", help="JD or ISO date (UTC)")
    backfill.add_argument("--fid", help="filter version (default: the active one)")
    backfill.add_argument("--max-alerts", type=int, help="stop after this many alerts")
    backfill.add_argument("--job", help="resume (or watch) this back-fill job instead")
    backfill.set_defaults(func=cmd_backfill)

    bench = sub.add_parser("bench", help="run the benchmarks (bench/)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for bench")
    bench.set_defaults(func=cmd_bench)

    develop = sub.add_parser("develop", help="install pre-commit hooks")
    develop.set_defaults(func=cmd_develop)

    lint = sub.add_parser("lint", help="ruff check + format check + mypy (strict)")
    lint.set_defaults(func=cmd_lint)
    return parser


PASSTHROUGH = {"test": "pytest_args", "bench": "bench_args"}
HELP = {"-h", "--help"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] in PASSTHROUGH and (argv[0] == "bench" or not HELP & set(argv[1:])):
        # everything after `test` / `bench` goes to pytest / the benchmark unchanged (`bench
        # --help` too: the benchmark lists its own options)
        args = parser.parse_args(argv[:1])
        setattr(args, PASSTHROUGH[argv[0]], argv[1:])
    else:
        args = parser.parse_args(argv)
    os.chdir(ROOT)  # relative paths (`seed data/catalogs`, compose files) are the checkout's
    args.func(args)


if __name__ == "__main__":
    main()
