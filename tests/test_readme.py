"""README's first two commands are what a newcomer runs and what CI runs: keep them true."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_install_and_quickstart_then_tests():
    quickstart, tests = command_blocks()[:2]
    assert quickstart.strip() == "pip install -e . && mlx-surgical quickstart"
    assert "pytest" in tests and '".[dev,server]"' in tests


def test_ci_runs_exactly_the_readme_test_command():
    test_command = command_blocks()[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
