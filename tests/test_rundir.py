"""The run directory's layout and records, the import rule, and run directories written by
earlier versions (tests/data/run-v0.1 was written by mlx_surgical 0.1.0 before rundir.py)."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_surgical.adapter import AdapterConfig, read_adapter
from mlx_surgical.cli import cli
from mlx_surgical.data import sample_path
from mlx_surgical.errors import UserError
from mlx_surgical.export import export_adapter
from mlx_surgical.generate import answer, prompt_format_for
from mlx_surgical.pipeline import resume_run
from mlx_surgical.registry import list_adapters, verify
from mlx_surgical.rundir import RunDir, RunInfo
from mlx_surgical.surgery import load_with_adapter

PACKAGE = Path(__file__).resolve().parents[1] / "mlx_surgical"
OLD_RUN = Path(__file__).parent / "data" / "run-v0.1"

NO_MLX_CHECK = """
import sys
from click.testing import CliRunner
from fastapi.testclient import TestClient
import mlx_surgical.cli, mlx_surgical.registry, mlx_surgical.jobs, mlx_surgical.rundir, mlx_surgical.adapter
from mlx_surgical.config import ServeConfig
from mlx_surgical.server import create_app
result = CliRunner().invoke(mlx_surgical.cli.cli, ["adapters", "--root", sys.argv[1], "list"])
assert result.exit_code == 0 and "run-v0.1" in result.output, result.output
with TestClient(create_app(ServeConfig(workspace=sys.argv[2])), base_url="http://127.0.0.1") as client:
    assert client.get("/api/training/jobs").json() == []
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm"))
print(" ".join(loaded))
"""


def test_adapters_list_cli_and_job_routes_do_not_import_mlx(tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(OLD_RUN, root / OLD_RUN.name)
    result = subprocess.run([sys.executable, "-c", NO_MLX_CHECK, str(root), str(tmp_path / "workspace")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported: {result.stdout}"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _top_level_imports(path: Path) -> set[str]:
    """Package modules a module imports when it is imported (not inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0]
            target = f"{base}.{node.module}" if node.module else base
            # `from . import gguf` imports the module gguf; `from .x import f` imports x.
            found |= {f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in node.names}
    return found


def test_no_import_cycle_in_the_package():
    modules = {_module_name(path): _top_level_imports(path) for path in PACKAGE.rglob("*.py")}
    visiting, done = [], set()

    def visit(name):
        if name in visiting:
            raise AssertionError("import cycle: " + " -> ".join(visiting[visiting.index(name):] + [name]))
        if name in done or name not in modules:
            return
        visiting.append(name)
        for target in modules[name]:
            if target != name and not name.startswith(target + "."):  # a package's own __init__
                visit(target)
        visiting.pop()
        done.add(name)

    for name in modules:
        visit(name)


def test_run_info_round_trips_and_keeps_unknown_keys(tmp_path):
    info = RunInfo(name="r")
    info.extra["from_the_future"] = {"x": 1}
    info.save(tmp_path)
    again = RunInfo.load(tmp_path)
    assert again == info
    assert json.loads(RunDir(tmp_path).info.read_text())["from_the_future"] == {"x": 1}


def test_an_adapter_config_from_a_newer_version_still_reads(trained_run, tmp_path):
    """A key a later version adds to the prompt record is ignored, not a refusal."""
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run, adapter)
    raw = json.loads((adapter / "adapter_config.json").read_text())
    raw["prompt"]["added_later"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(raw))
    config = AdapterConfig.read(adapter)
    assert config.prompt.max_seq_length == 512 and config.prompt.mask_prompt is True


def test_run_directory_from_the_previous_layout_still_loads(tiny_model, tmp_path):
    run_dir = tmp_path / "adapters" / OLD_RUN.name
    shutil.copytree(OLD_RUN, run_dir)

    info = RunInfo.load(run_dir)
    assert (info.status, info.update, info.trainable_parameters) == ("succeeded", 4, 5120)
    assert info.data.train_examples == 104 and info.best.update == 4 and info.final.val_loss is not None
    config = AdapterConfig.read(run_dir)
    assert (config.rank, config.alpha, config.target_modules) == (8, 16.0, ["q_proj", "k_proj", "v_proj"])
    assert AdapterConfig.read(run_dir / "best").update == 4

    [entry] = list_adapters(tmp_path / "adapters")
    assert entry.name == OLD_RUN.name and entry.best_val_loss == info.best.val_loss
    assert any("checksum ok" in line for line in verify(tmp_path / "adapters", OLD_RUN.name, str(tiny_model)))
    assert len(read_adapter(run_dir).pairs) == 6
    peft = export_adapter(run_dir, "peft", tmp_path / "peft")
    assert json.loads((peft / "adapter_config.json").read_text())["lora_alpha"] == 16.0

    adapted = load_with_adapter(str(tiny_model), run_dir)
    assert prompt_format_for(adapted, run_dir).style == "llama2"
    assert isinstance(answer(adapted, prompt_format_for(adapted, run_dir), "Write add.", max_tokens=4), str)

    # Resume its kept checkpoint (update 2 of 4) with the new code.
    run_config = json.loads(RunDir(run_dir).config.read_text())
    run_config["model"]["path"] = str(tiny_model)
    run_config["data"].update(train=str(sample_path("train")), valid=str(sample_path("valid")))
    RunDir(run_dir).config.write_text(json.dumps(run_config))
    with pytest.raises(UserError, match="this run already finished"):
        resume_run(run_dir, progress=False, log=lambda _: None)
    record = json.loads(RunDir(run_dir).info.read_text())
    RunDir(run_dir).info.write_text(json.dumps({**record, "status": "interrupted"}))  # as if stopped at update 2
    resumed = resume_run(run_dir, progress=False, log=lambda _: None)
    assert resumed.status == "succeeded" and resumed.updates == 4
    assert resumed.first_loss == json.loads(RunDir(run_dir).metrics.read_text().splitlines()[0])["loss"]
    # Its run.json's copy of the base-model record is dropped: adapter_config.json holds the one in force.
    assert "base_model" in json.loads((OLD_RUN / "run.json").read_text())
    assert "base_model" not in json.loads(RunDir(run_dir).info.read_text())


def test_cli_shows_an_old_run(tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(OLD_RUN, root / OLD_RUN.name)
    shown = CliRunner().invoke(cli, ["adapters", "--root", str(root), "show", OLD_RUN.name])
    assert shown.exit_code == 0 and json.loads(shown.output)["status"] == "succeeded"


def test_run_files_and_exports_get_the_umasks_permissions(make_config, tmp_path):
    import os
    import stat

    from mlx_surgical.files import staged_directory, write_text_atomic
    from mlx_surgical.pipeline import train_run

    def modes(root: Path) -> set[tuple[str, int]]:
        paths = [root, *root.rglob("*")] if root.is_dir() else [root]
        return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in paths}

    previous = os.umask(0o022)
    try:
        run_dir = train_run(make_config(iters=3), progress=False, log=lambda _: None).run_dir
        exports = [export_adapter(run_dir, fmt, tmp_path / f"export-{fmt}") for fmt in ("mlx", "peft", "gguf")]
        os.umask(0o027)
        write_text_atomic(tmp_path / "group" / "note.txt", "x")
        with staged_directory(tmp_path / "group" / "dir") as staging:
            (staging / "f").write_text("x")
    finally:
        os.umask(previous)
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "best").is_dir()
    for path in (run_dir, *exports):
        assert modes(path) <= {("dir", 0o755), ("file", 0o644)}, path
    assert modes(tmp_path / "group") == {("dir", 0o750), ("file", 0o640)}


@pytest.mark.parametrize("name, read", [("metrics.jsonl", RunDir.metric_rows),
                                        ("adapters.safetensors", RunDir.checksums)])
def test_a_directory_where_a_run_file_belongs_is_named(tmp_path, name, read):
    (tmp_path / name).mkdir()
    with pytest.raises(UserError, match=f"{name}: is a directory, not a file"):
        read(RunDir(tmp_path))
