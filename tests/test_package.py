"""The distribution installs one namespace, ``m2m``, and one console command."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import pytest

import m2m.agents
import m2m.bus
import m2m.physics
import m2m.scenarios

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("module", "folder"),
    [(m2m.agents, "agents"), (m2m.bus, "bus"), (m2m.physics, "physics"), (m2m.scenarios, "scenarios")],
)
def test_subpackages_map_to_top_level_folders(module, folder):
    assert Path(module.__file__).resolve().parent == REPO / folder


@pytest.mark.parametrize("name", ["agents", "bus", "physics", "scenarios"])
def test_no_generic_top_level_module_is_installed(name):
    for site_dir in map(Path, site.getsitepackages()):
        assert not (site_dir / name).exists()
        assert not (site_dir / f"{name}.py").exists()
        # An editable install maps packages through a finder module: only m2m.* may appear there.
        for finder in site_dir.glob("__editable___m2m_planner*_finder.py"):
            mapping = finder.read_text().split("MAPPING", 1)[1].split("\n", 1)[0]
            assert f"'{name}'" not in mapping and f'"{name}"' not in mapping


def test_console_command_reports_version_and_lists_subcommands():
    version = subprocess.run(
        [sys.executable, "-m", "m2m.cli.main", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("m2m ")
    helptext = subprocess.run(
        [sys.executable, "-m", "m2m.cli.main", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "bench" in helptext


def test_unknown_subcommand_fails_with_usage():
    result = subprocess.run(
        [sys.executable, "-m", "m2m.cli.main", "no-such-command"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
