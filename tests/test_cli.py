"""Entry points: the console script and `python -m mlx_surgical` are the same program."""

import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from mlx_surgical import __version__
from mlx_surgical.cli import cli

# The console script installed beside this interpreter (the venv's bin/ need not be on PATH).
SCRIPT = shutil.which("mlx-surgical", path=str(Path(sys.executable).parent)) or "mlx-surgical"
COMMANDS = ["quickstart", "tiny-model", "train", "validate", "config-help", "plan", "convert", "export",
            "generate", "adapters", "serve", "doctor"]


def test_help_lists_every_command_with_a_description():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        line = next(line for line in result.output.splitlines() if line.strip().startswith(command + " "))
        assert len(line.split(maxsplit=1)[1]) > 10, line


def test_version_and_python_dash_m_behave_like_the_console_script():
    module = subprocess.run([sys.executable, "-m", "mlx_surgical", "--version"], capture_output=True, text=True)
    script = subprocess.run([SCRIPT, "--version"], capture_output=True, text=True)
    assert module.returncode == script.returncode == 0
    assert module.stdout == script.stdout == f"mlx-surgical, version {__version__}\n"
    module_help = subprocess.run([sys.executable, "-m", "mlx_surgical", "--help"], capture_output=True, text=True)
    script_help = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True)
    assert module_help.stdout == script_help.stdout


def test_bad_config_exits_2_with_one_line_per_problem(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"path": "m"}, "training": {"epochs": 0, "colour": 1}}')
    result = CliRunner().invoke(cli, ["validate", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) >= 3
    assert any("training.colour: unknown key" in line for line in lines)
    assert any("training.epochs: must be at least 1" in line for line in lines)


def test_validate_checks_data_without_weights(tiny_model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a"}\n')
    config = tmp_path / "c.json"
    config.write_text('{"model": {"path": "%s"}, "data": {"train": "train.jsonl"}}' % tiny_model)
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 2
    assert "train.jsonl:2: field 'response' must be a non-empty string" in result.output
    data.write_text('{"instruction": "a", "response": "b"}\n')
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "train: 1 examples" in result.output
