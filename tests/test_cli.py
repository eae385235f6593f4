"""Entry points: the console script and `python -m mlx_surgical` are the same program; what the
commands print (problems, counts, commands to paste)."""

import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_surgical import __version__
from mlx_surgical.cli import cli
from mlx_surgical.config import save_config
from mlx_surgical.errors import UserError

# The console script installed beside this interpreter (the venv's bin/ need not be on PATH).
SCRIPT = shutil.which("mlx-surgical", path=str(Path(sys.executable).parent)) or "mlx-surgical"
COMMANDS = ["quickstart", "tiny-model", "train", "validate", "config-help", "plan", "convert", "export",
            "generate", "eval", "adapters", "serve", "doctor"]


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
    assert "train: 1 example\n" in result.output and "schedule: 1 optimizer update\n" in result.output

    # A missing data file and a missing model folder, reported together.
    config.write_text('{"model": {"path": "%s"}, "data": {"train": "gone.jsonl"}}' % (tmp_path / "no-model"))
    result = CliRunner().invoke(cli, ["validate", str(config)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 2, result.output
    assert any("gone.jsonl" in e for e in errors) and any("no-model" in e for e in errors), result.output


def test_every_suggested_command_pastes_into_bash(make_config, tmp_path, pasted, monkeypatch):
    """Each command we print, for paths with quotes, spaces, $, backticks and backslashes,
    reaches the program with exactly the intended arguments."""
    from conftest import AWKWARD_NAME

    from mlx_surgical.backend import on_cpu_backend, slow_path_warnings
    from mlx_surgical.errors import TrainingInterrupted
    from mlx_surgical.pipeline import RunResult, StopFlag, train_run
    from mlx_surgical.provenance import Provenance
    from mlx_surgical.quickstart import TRY_PROMPT, QuickstartResult
    from mlx_surgical.shape import ModelShape

    config = make_config(iters=3)
    config.output.dir = str(tmp_path / AWKWARD_NAME)
    run_dir = Path(config.output.dir) / "run"
    # Stopped (as by Ctrl-C) after its first update: the hint names the run.
    with pytest.raises(TrainingInterrupted) as stopped:
        train_run(config, progress=False, log=lambda _: None, stop_flag=StopFlag(also=lambda: True))
    assert pasted(str(stopped.value).split("Continue with: ")[1]) == ["mlx-surgical", "train", "--resume", str(run_dir)]
    with pytest.raises(UserError) as taken:
        train_run(config, progress=False, log=lambda _: None)
    hint = str(taken.value).split("resume it with `")[1].rsplit("` or choose", 1)[0]
    assert pasted(hint) == ["mlx-surgical", "train", "--resume", str(run_dir)]

    # The quickstart's suggestions, as printed.
    model_dir = tmp_path / AWKWARD_NAME / "models" / "tiny"
    result = QuickstartResult(RunResult(run_dir, "succeeded", 3, 1, 2.0, 1.0, 1.0, 1.0), model_dir, "p", "a", "b",
                              1.0, 1, 2.0, 1.0)
    lines = result.report_lines()
    commands = lines[lines.index("use it:") + 1:lines.index("use it:") + 4]
    assert [pasted(line) for line in commands] == [
        ["mlx-surgical", "generate", "--model", str(model_dir), "--adapter", str(run_dir), TRY_PROMPT],
        ["mlx_lm.generate", "--model", str(model_dir), "--adapter-path", str(run_dir), "--prompt",
         f"[INST] {TRY_PROMPT} [/INST]"],
        ["mlx-surgical", "export", str(run_dir), "--format", "peft"]]
    # mlx-lm is pointed to the OpenBLAS that mlx-surgical preloads.
    monkeypatch.setenv("LD_PRELOAD", "/opt/blas/libopenblas.so.0")
    assert result.suggested_commands()[1][:3] == ["env", "LD_PRELOAD=/opt/blas/libopenblas.so.0", "mlx_lm.generate"]

    # The conversion a quantized base on the CPU is pointed to.
    if on_cpu_backend():
        source = tmp_path / AWKWARD_NAME / "hf model"
        quantized = tmp_path / "quantized"
        quantized.mkdir()
        Provenance(source=str(source), local_source=str(source), bits=4).write(quantized)
        config.model.path = str(quantized)
        shape = ModelShape("llama", 64, 192, 2, 4, 2, 512, 16, quant_bits=4, quant_group_size=64)
        (warning,) = [w for w in slow_path_warnings(config, shape) if "-bit" in w]
        fix = warning.split("Fix: ")[1].rsplit(", and point", 1)[0]
        assert pasted(fix) == ["mlx-surgical", "convert", str(source), "--bits", "none", "--dtype", "float32"]


@pytest.mark.parametrize("argv, expected", [
    (["convert", "./nope.gguf"], "SOURCE: ./nope.gguf does not exist; give a Hugging Face repo id"),
    (["eval", "adapters/nope"], "adapters/nope: no such directory; `mlx-surgical adapters list` shows the runs"),
    (["export", "adapters/nope", "--format", "peft"], "adapters/nope: no such directory"),
    (["eval", "mine"], "mine: no such directory; did you mean adapters/mine?"),
    (["export", "nope", "--format", "peft"], "nope: no such directory; `mlx-surgical adapters list` shows the runs in "
                                             "adapters"),
    (["train", "--resume", "runs/nope"], "runs/nope: no such directory; `mlx-surgical adapters --root runs list`"),
    (["generate", "--model", "models/nope", "hi"], "--model: the model folder models/nope does not exist; create it"),
    (["train", "held_out.jsonl"], "held_out.jsonl: a .jsonl file holds examples, not a run config"),
])
def test_a_mistyped_path_says_what_is_missing_and_what_to_run(tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "held_out.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    (tmp_path / "adapters" / "mine").mkdir(parents=True)
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {expected}") or f"\nerror: {expected}" in result.output, result.output
    assert "Traceback" not in result.output


def test_model_output_is_shown_safely_and_numbers_read_naturally():
    from mlx_surgical.console import counted, printable

    # Only control characters are escaped: every script's spaces and joiners stay as they are.
    assert printable("日本語\u3000テスト\u00a0x\u200d\ttab\r\nnext") == "日本語\u3000テスト\u00a0x\u200d\ttab\nnext"
    assert printable("a\x00b\x07c\x1b[2J\rd\x7f") == "a\\x00b\\x07c\\x1b[2J\\rd\\x7f"
    assert [counted(n, "epoch") for n in (1, 0.999, 1.5, 0.307692, 1234.5)] == \
        ["1 epoch", "1 epoch", "1.5 epochs", "0.31 epochs", "1,234.5 epochs"]


def test_the_hint_for_a_missing_model_folder_pastes(pasted):
    from mlx_surgical.model import how_to_create

    hint = how_to_create("~/models/my model-8bit")
    command = hint[hint.index("`") + 1:hint.rindex("`")]
    assert pasted(command) == ["mlx-surgical", "convert", "SOURCE", "--bits", "8", "--out",
                               str(Path.home() / "models" / "my model-8bit")]
    assert "--bits" not in how_to_create("models/x-16bit")  # convert takes 4 or 8: no option it would refuse
    assert pasted(how_to_create("models/tiny-llama").split("`")[1]) == [
        "mlx-surgical", "quickstart", "--model-dir", "models/tiny-llama"]


@pytest.mark.parametrize("argv, named", [
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--max-body-mb", "nan"], "--max-body-mb"),
    (["tiny-model", "{tmp}/x", "--heads", "0"], "--heads"),
    (["tiny-model", "{tmp}/x", "--layers", "0"], "--layers"),
    (["tiny-model", "{tmp}/x", "--seed", "-1"], "--seed"),
    (["quickstart", "--epochs", "0"], "--epochs"),
    (["generate", "--max-tokens", "-1", "hi"], "--max-tokens"),
])
def test_an_impossible_option_value_is_refused_before_anything_runs(tmp_path, argv, named):
    result = CliRunner().invoke(cli, [a.format(tmp=tmp_path) for a in argv], catch_exceptions=False)
    assert result.exit_code == 2 and f"Invalid value for '{named}'" in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_a_learning_rate_for_a_new_run_is_refused_before_anything_is_written(make_config, tmp_path):
    save_config(make_config(), tmp_path / "run.json")
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "run.json"), "--learning-rate", "1e-3"])
    assert result.exit_code == 2 and "error: --learning-rate goes with --resume" in result.output, result.output
    assert not (tmp_path / "adapters").exists()


def test_tiny_model_options_default_to_the_tiny_shape():
    from mlx_surgical.tiny import TinyShape

    defaults = {p.name: p.default for p in cli.commands["tiny-model"].params}
    assert {k: v for k, v in asdict(TinyShape()).items() if k in defaults} == {
        k: v for k, v in defaults.items() if k not in ("out_dir", "seed")}


def test_serve_without_the_server_extra_names_the_command_that_installs_it():
    hide_fastapi = ("import sys; sys.modules['fastapi'] = None; from mlx_surgical.cli import cli; "
                    "cli(sys.argv[1:], prog_name='mlx-surgical')")
    result = subprocess.run([sys.executable, "-c", hide_fastapi, "serve"], capture_output=True, text=True)
    assert result.returncode == 2 and "error: serve needs the server extra (fastapi is missing)" in result.stderr
    assert 'pip install -e ".[server]"' in result.stderr and "Traceback" not in result.stderr
