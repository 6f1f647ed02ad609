"""systemd/wirekeep.service and systemd/wirekeep.sysusers.

``systemd-analyze verify`` exits 0 even on unknown keys and bad values, so its output
is what is checked: it must print nothing. ``systemd-analyze security --offline=yes``
must score the unit at most 2.0. Both need systemd-analyze (systemd 252 here) and skip
without it; the unit's content is checked everywhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from controlkit import REPO

UNIT = REPO / "systemd" / "wirekeep.service"
SYSUSERS = REPO / "systemd" / "wirekeep.sysusers"
EXAMPLE = REPO / "systemd" / "wirekeep.toml"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def settings(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of the [Service] section (comments skipped), repeatable keys."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}{key}", []).append(value)
    return out


def service(key: str) -> list[str]:
    return settings(UNIT).get(f"[Service]{key}", [])


def test_the_unit_says_what_the_daemon_does() -> None:
    assert service("Type") == ["notify"]
    assert service("NotifyAccess") == ["main"]
    assert service("ExecStart")[0].endswith("wirekeep daemon --config /etc/wirekeep/wirekeep.toml")
    # ExecReload waits for the result (the CLI over the socket), unlike `kill -HUP`.
    assert service("ExecReload")[0].endswith("reload")
    assert "kill" not in service("ExecReload")[0]
    assert service("WatchdogSec") == ["30s"]
    assert service("StateDirectory") == ["wirekeep"]
    assert service("RuntimeDirectory") == ["wirekeep"]
    assert service("User") == ["wirekeep"]
    credentials = {v.split(":", 1)[0] for v in service("LoadCredential")}
    lines = EXAMPLE.read_text().splitlines()
    active = "\n".join(x for x in lines if not x.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{cred:([A-Za-z0-9_]+)\}", active))
    assert credentials == used  # one line per credential the example configuration uses
    for key in ("NoNewPrivileges", "ProtectSystem", "RestrictAddressFamilies", "PrivateTmp"):
        assert service(key), key
    assert "PrivateUsers" not in UNIT.read_text().replace("Not PrivateUsers=", "")


@needs_analyze
def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    # verify checks that ExecStart= exists: point it at this environment's wirekeep.
    wirekeep = str(Path(sys.executable).parent / "wirekeep")
    unit = tmp_path / "wirekeep.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/wirekeep", wirekeep))
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, check=False, timeout=60
    )
    assert (done.stdout + done.stderr) == "", done.stdout + done.stderr
    assert done.returncode == 0


@needs_analyze
def test_systemd_analyze_security_scores_at_most_2() -> None:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(UNIT)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for wirekeep.service: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match[1]) <= 2.0, done.stdout
    claimed = re.search(r"scores this unit ([0-9.]+)", UNIT.read_text())
    assert claimed
    assert claimed[1] == match[1]  # the comment in the unit tells the truth


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_entry(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    done = subprocess.run(
        ["systemd-sysusers", "--dry-run", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Creating user 'wirekeep'" in output
    assert "Creating group 'wirekeep-admin'" in output
    assert "ignoring" not in output.lower()
