"""The container images, proved without Docker: for each `Dockerfile.*`, a venv with ONLY the
requirement files its `RUN pip install -r` lines name (no system site packages) and a copy of ONLY
the paths it `COPY`s must import every module it ships, start its entry point as far as its
`--help` or its configuration check, and pass its HEALTHCHECK command once the service runs (and
fail it before). The venvs are built once per requirements digest under ~/.cache/kowalski."""

from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ingester.replay import replay
from kowalski.config import ROOT
from kowalski.services.process import free_port, start_process, stop_process, wait_until

from .conftest import ztf_alert_files

DOCKERFILES = ["Dockerfile.api", "Dockerfile.ingester"]
VENV_CACHE = Path.home() / ".cache" / "kowalski" / "image-venvs"
# imported only by an optional backend, installed by hand (requirements/tensorflow.txt)
OPTIONAL_IMPORTS = {"tf_keras"}
BUILD_TIMEOUT_S = 1500


@dataclass(frozen=True)
class Image:
    dockerfile: str
    copies: tuple[str, ...]  # the COPY sources, requirements/ included
    requirements: tuple[str, ...]  # the files of `RUN pip install -r`
    cmd: tuple[str, ...]
    healthcheck: tuple[str, ...]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def command_argv(arguments: str) -> tuple[str, ...]:
    """A CMD's argv: the exec form (a JSON list), or the shell form run by /bin/sh -c."""
    if not arguments.startswith("["):
        return ("/bin/sh", "-c", arguments)
    argv: list[str] = json.loads(arguments)
    return tuple(argv)


def parse_dockerfile(name: str) -> Image:
    copies: list[str] = []
    requirements: list[str] = []
    cmd: tuple[str, ...] = ()
    healthcheck: tuple[str, ...] = ()
    for keyword, arguments in instructions((ROOT / name).read_text()):
        if keyword == "COPY":
            assert not arguments.startswith("--"), f"{name}: COPY {arguments}"
            copies += arguments.split()[:-1]
        elif keyword == "RUN":
            requirements += (
                re.findall(r"-r\s+(\S+)", arguments) if "pip install" in arguments else []
            )
        elif keyword == "CMD":
            cmd = command_argv(arguments)
        elif keyword == "HEALTHCHECK":
            healthcheck = command_argv(arguments[arguments.index(" CMD ") + len(" CMD ") :].strip())
    return Image(name, tuple(copies), tuple(requirements), cmd, healthcheck)


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of `path`, following `-r` includes."""
    lines: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line.startswith("-r"):
            lines += requirement_lines(path.parent / line[2:].strip())
        elif line:
            lines.append(line)
    return lines


def normalize(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def pinned_distributions(image: Image) -> set[str]:
    lines = [line for req in image.requirements for line in requirement_lines(ROOT / req)]
    return {normalize(line.split("==")[0]) for line in lines}


def shipped_python_files(image: Image) -> list[Path]:
    """The .py files the image ships (paths relative to the image's working directory)."""
    files: list[Path] = []
    for source in image.copies:
        path = ROOT / source
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path] * (path.suffix == ".py")
        files += [f.relative_to(ROOT) for f in found if "__pycache__" not in f.parts]
    return files


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def third_party_imports(image: Image) -> dict[str, set[str]]:
    """Top-level import name -> the shipped files importing it, for names that are neither the
    standard library nor one of the shipped packages."""
    files = shipped_python_files(image)
    first_party = {f.parts[0] if len(f.parts) > 1 else f.stem for f in files}
    found: dict[str, set[str]] = {}
    for path in files:
        for name in top_level_imports(path) - first_party - set(sys.stdlib_module_names):
            found.setdefault(name, set()).add(str(path))
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_third_party_import_is_pinned_in_the_image_requirements(name: str) -> None:
    image = parse_dockerfile(name)
    assert image.requirements and image.cmd and image.healthcheck
    pinned = pinned_distributions(image)
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, files in sorted(third_party_imports(image).items()):
        if module in OPTIONAL_IMPORTS:
            continue
        dists = {normalize(d) for d in distributions.get(module, [])}
        if not dists & pinned:
            missing.append(f"{module} ({sorted(dists) or 'no distribution'}; {sorted(files)[0]})")
    assert not missing, f"{name}: imported but not in {image.requirements}: {missing}"


# ---------------------------------------------------------------- the images, as venvs


def venv_digest(image: Image) -> str:
    digest = hashlib.sha256(sys.version.encode())
    for req in sorted(
        {
            *image.requirements,
            *("requirements/" + p.name for p in (ROOT / "requirements").glob("*.txt")),
        }
    ):
        digest.update(req.encode() + (ROOT / req).read_bytes())
    return digest.hexdigest()[:16]


def image_venv(image: Image) -> Path:
    """A venv with only the image's requirement files installed (built once per digest, under a
    lock: concurrent sessions wait for one build)."""
    target = VENV_CACHE / f"{image.dockerfile.lower().replace('.', '-')}-{venv_digest(image)}"
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "complete").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=300)
        args = [arg for req in image.requirements for arg in ("-r", str(ROOT / req))]
        pip = [str(target / "bin" / "python"), "-m", "pip", "install", "-q", *args]
        result = subprocess.run(pip, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        assert result.returncode == 0, f"{image.dockerfile}: pip failed: {result.stderr[-2000:]}"
        (target / "complete").write_text(" ".join(image.requirements))
    return target


@dataclass(frozen=True)
class Built:
    image: Image
    venv: Path
    workdir: Path  # a copy of only the COPY'd paths

    def env(self, **extra: str) -> dict[str, str]:
        """An environment with nothing of this checkout: the venv's bin first on PATH."""
        keep = {"HOME", "LANG", "LC_ALL", "TMPDIR", "USER"}
        base = {k: v for k, v in os.environ.items() if k in keep}
        path = f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
        return {
            **base,
            "PATH": path,
            "PYTHONNOUSERSITE": "1",
            "PYTHONPATH": str(self.workdir),
            **extra,
        }

    def run(
        self, *argv: str, env: dict[str, str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), capture_output=True, text=True, env=env, cwd=self.workdir, timeout=timeout
        )


def copy_shipped(image: Image, workdir: Path) -> None:
    for source in image.copies:
        path, target = ROOT / source, workdir / source
        if path.is_dir():
            shutil.copytree(
                path, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
            )
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


@pytest.fixture(scope="session", params=DOCKERFILES)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    image = parse_dockerfile(request.param)
    workdir = tmp_path_factory.mktemp(request.param.replace(".", "-"))
    copy_shipped(image, workdir)
    return Built(image, image_venv(image), workdir)


@pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
def test_image_imports_every_module_it_ships(built: Built) -> None:
    modules = [module_name(f) for f in shipped_python_files(built.image)]
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {exc!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = built.run(
        "python", "-c", script, *modules, env=built.env(MPLBACKEND="Agg"), timeout=600
    )
    assert result.returncode == 0, (
        f"{built.image.dockerfile}: {result.stdout}{result.stderr[-2000:]}"
    )
    assert len(modules) > 10


@pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
def test_image_entry_point_starts(built: Built) -> None:
    if built.image.cmd[-1] == "api":
        # no option: it loads the configuration and refuses the public default secrets
        result = built.run(*built.image.cmd, env=built.env())
        assert result.returncode == 1
        assert result.stderr.startswith("error: refusing to serve with the default server.")
        assert len(result.stderr.strip().splitlines()) == 1
    else:
        result = built.run(*built.image.cmd, "--help", env=built.env())
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: python -m {built.image.cmd[-1]}")


def service_env(built: Built, test_environ: dict[str, str], kafka_bootstrap: str) -> dict[str, str]:
    """What compose gives a service: real secrets (not insecure_dev), the session's servers, a
    consumer group of its own (no other test's consumer can pass the ingester's probe)."""
    settings = {k: v for k, v in test_environ.items() if k.startswith(("KOWALSKI", "MONGODB_URI"))}
    settings.pop("KOWALSKI__server__insecure_dev")
    return built.env(
        **settings,
        KOWALSKI_ADMIN_PASSWORD="image-" + uuid.uuid4().hex,
        KOWALSKI__server__host="127.0.0.1",
        KOWALSKI__server__port=str(free_port()),
        KOWALSKI__server__processes="1",
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        KOWALSKI__kafka__group=f"image-test-{uuid.uuid4().hex[:8]}",
        KOWALSKI__dask__n_workers="1",
        KOWALSKI__dask__dashboard_address="127.0.0.1:0",
        MPLBACKEND="Agg",
    )


def own_alert_topic(built: Built, env: dict[str, str]) -> dict[str, str]:
    """For the ingester: one real ZTF packet on a topic of this test's own, which only its
    subscription matches (a consumer joins its group once a topic matches)."""
    if built.image.cmd[-1] != "ingester":
        return env
    suffix = f"_image{uuid.uuid4().hex[:8]}"
    replay(env["KAFKA_BOOTSTRAP_SERVERS"], ztf_alert_files()[:1], suffix=suffix, progress=False)
    return {**env, "KOWALSKI__kafka__topics__ZTF": f"^ztf_[0-9]{{8}}_programid[123]{suffix}$"}


@pytest.fixture
def served(
    built: Built, test_environ: dict[str, str], kafka_bootstrap: str, tmp_path: Path
) -> Iterator[tuple[Built, dict[str, str], subprocess.Popen[bytes], Path]]:
    env = own_alert_topic(built, service_env(built, test_environ, kafka_bootstrap))
    before = built.run(*built.image.healthcheck, env=env)
    assert before.returncode != 0, "the health check passes before the service runs"
    log = tmp_path / "service.log"
    proc = start_process(list(built.image.cmd), log, cwd=built.workdir, env=env)
    try:
        yield built, env, proc, log
    finally:
        stop_process(proc, timeout=60)


@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_image_healthcheck_passes_once_the_service_runs(
    served: tuple[Built, dict[str, str], subprocess.Popen[bytes], Path],
) -> None:
    built, env, proc, log = served

    def healthy() -> bool:
        return built.run(*built.image.healthcheck, env=env, timeout=60).returncode == 0

    wait_until(healthy, proc, timeout=300, what=f"{built.image.dockerfile}'s HEALTHCHECK", log=log)
