"""`kowalski.py seed` gives mongorestore the database password in a `--config` file of mode 0600
(deleted after), never on its command line, where every user of the machine can read it
(issue #22 item 6). mongorestore is not installed here: a stand-in executable on PATH records
what the real one would be given."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from ops.seed import restore

STAND_IN = """#!{python}
import json, os, stat, sys
config = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")]
seen = {{"argv": sys.argv[1:], "configs": {{}}}}
for path in config:
    seen["configs"][path] = {{
        "mode": stat.S_IMODE(os.stat(path).st_mode),
        "text": open(path).read(),
    }}
json.dump(seen, open({record!r}, "w"))
"""


def test_mongorestore_reads_the_password_from_a_private_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "seen.json"
    tool = tmp_path / "bin" / "mongorestore"
    tool.parent.mkdir()
    tool.write_text(STAND_IN.format(python=sys.executable, record=str(record)))
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tool.parent))
    password = "s3cret:p@ss/word"
    uri = "mongodb://kowalski:s3cret%3Ap%40ss%2Fword@db.example.org:27017/?authSource=admin"
    archive = tmp_path / "Gaia_DR2.dump.gz"
    archive.write_bytes(b"")
    assert restore(uri, "kowalski", archive, drop=True) == "Gaia_DR2.dump.gz: restored"
    seen = json.loads(record.read_text())
    command_line = " ".join(seen["argv"])
    assert "s3cret" not in command_line, command_line
    assert "--uri=mongodb://kowalski@db.example.org:27017/?authSource=admin" in seen["argv"]
    assert {"--gzip", "--drop", "--nsInclude=kowalski.*"} <= set(seen["argv"])
    ((path, config),) = seen["configs"].items()
    assert config["mode"] == 0o600
    assert yaml.safe_load(config["text"]) == {"password": password}
    assert not Path(path).exists()  # deleted after
    # no password in the URI: no config file either
    assert restore("mongodb://db.example.org:27017/", "kowalski", archive, drop=False)
    assert json.loads(record.read_text())["configs"] == {}
