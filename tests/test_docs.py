"""The README is the newcomer's way in: its commands and settings table must be true."""

from __future__ import annotations

import re
from pathlib import Path

from service.config import settings_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TABLE = re.compile(r"<!-- settings-table:[^>]*-->\n(.*?)<!-- end settings-table -->", re.S)


def test_readme_settings_table_matches_the_settings() -> None:
    found = TABLE.search(README)
    assert found, "README lost its settings table markers"
    assert found.group(1).strip() == settings_table().strip(), (
        "regenerate it: python -m service.config"
    )


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    run, test = commands[0], commands[1]
    assert "newsletter serve" in run
    assert test.strip() in (ROOT / ".ci" / "run").read_text()
