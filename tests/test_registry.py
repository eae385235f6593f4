"""adapters list|show|verify|rm and generate, through the CLI as a user runs them."""

import json
import shutil

from click.testing import CliRunner

from mlx_surgical.cli import cli


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def copy_run(trained_run, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(trained_run, root / trained_run.name)
    return root, root / trained_run.name


def test_list_show_verify_remove(trained_run, tmp_path):
    root, run_dir = copy_run(trained_run, tmp_path)
    listed = json.loads(run("adapters", "--root", str(root), "list", "--json").output)
    assert [e["name"] for e in listed] == [run_dir.name]
    entry = listed[0]
    assert entry["status"] == "succeeded" and entry["trainable_parameters"] > 0
    assert entry["best_val_loss"] is not None and entry["size_bytes"] > 0
    table = run("adapters", "--root", str(root), "list").output
    assert run_dir.name in table and "best val" in table

    shown = json.loads(run("adapters", "--root", str(root), "show", run_dir.name).output)
    assert shown["adapter_config"]["lora_parameters"]["rank"] == 8

    verified = run("adapters", "--root", str(root), "verify", run_dir.name)
    assert verified.exit_code == 0, verified.output
    assert "adapters.safetensors: checksum ok" in verified.output and "shapes fit" in verified.output

    unasked = run("adapters", "--root", str(root), "rm", run_dir.name)  # no terminal to ask on
    assert unasked.exit_code == 2 and "pass --yes" in unasked.output and run_dir.exists()
    removed = run("adapters", "--root", str(root), "rm", run_dir.name, "--yes")
    assert removed.exit_code == 0 and not run_dir.exists()
    missing = run("adapters", "--root", str(root), "show", run_dir.name)
    assert missing.exit_code == 2 and "not found" in missing.output


def test_verify_catches_tampering_and_a_wrong_base(trained_run, tiny_model, other_tiny_model, tmp_path):
    root, run_dir = copy_run(trained_run, tmp_path)
    wrong = run("adapters", "--root", str(root), "verify", run_dir.name, "--model", str(other_tiny_model))
    assert wrong.exit_code == 2
    assert "needs A (128, 8)" in wrong.output and str(other_tiny_model) in wrong.output
    assert (f"this adapter was trained on {tiny_model} (llama 2 layers x hidden 64" in wrong.output
            and f"not on {other_tiny_model} (llama 3 layers x hidden 128" in wrong.output), wrong.output

    data = bytearray((run_dir / "adapters.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (run_dir / "adapters.safetensors").write_bytes(bytes(data))
    tampered = run("adapters", "--root", str(root), "verify", run_dir.name)
    assert tampered.exit_code == 2 and "checksum differs" in tampered.output


def test_generate_streams_and_compares(trained_run, tiny_model, other_tiny_model):
    answer = run("generate", "--model", str(tiny_model), "--adapter", str(trained_run), "--max-tokens", "8",
                 "Write a function")
    assert answer.exit_code == 0, answer.output
    assert answer.output.strip()
    compared = run("generate", "--model", str(tiny_model), "--adapter", str(trained_run), "--compare",
                   "--max-tokens", "8", input="Write a function")
    assert compared.exit_code == 0 and "=== base ===" in compared.output and "=== adapted ===" in compared.output
    # One model loaded for both sides; the base side is the base model's own answer, the adapted
    # side the adapter's; what a random model emits is shown without raw control characters.
    assert compared.output.count(" ...\n") == 1  # "loading <model> ..." once
    base_alone = run("generate", "--model", str(tiny_model), "--max-tokens", "8", "Write a function")
    base_side, adapted_side = compared.output.split("=== base ===\n")[1].split("\n=== adapted ===\n")
    after_loading = lambda output: output.split(" s\n", 1)[1].strip()  # noqa: E731
    assert base_side.strip() == after_loading(base_alone.output)
    assert adapted_side.strip() == after_loading(answer.output)
    assert all(c.isprintable() or c == "\n" for c in compared.output + base_alone.output + answer.output)
    recorded_base = run("generate", "--adapter", str(trained_run), "--max-tokens", "8", "Write a function")
    assert recorded_base.exit_code == 0 and after_loading(recorded_base.output) == after_loading(answer.output)
    assert f"loading {tiny_model} ..." in recorded_base.output  # the base the run trained on
    no_base = run("generate", "hi")
    assert no_base.exit_code == 2 and "--model: name the base model" in no_base.output
    refused = run("generate", "--model", str(other_tiny_model), "--adapter", str(trained_run), "hi")
    assert refused.exit_code == 2 and "not on" in refused.output and "Traceback" not in refused.output
