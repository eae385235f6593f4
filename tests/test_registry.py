"""adapters list|show|verify|rm and generate, through the CLI as a user runs them."""

import json
import shutil

import pytest
from click.testing import CliRunner

from mlx_surgical.cli import cli
from mlx_surgical.files import sha256_file


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
    wider = tmp_path / "wider-mlp"  # the same summary line, another shape: the message says what differs
    shutil.copytree(tiny_model, wider)
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    wrong = run("adapters", "--root", str(root), "verify", run_dir.name, "--model", str(wider))
    assert wrong.exit_code == 2
    assert f"intermediate_size {2 * config['intermediate_size']}, not {config['intermediate_size']})" in wrong.output

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
    for prompt, problem in ((b"def f():\n  \xff", "the prompt on stdin:2: not valid UTF-8 (byte 0xff at column 3)"),
                            (b" \n", "give a PROMPT argument or text on stdin")):
        refused = run("generate", "--model", str(tiny_model), input=prompt)
        assert refused.exit_code == 2 and problem in refused.output, refused.output
    refused = run("generate", "--compare", input=b"never read")
    assert refused.exit_code == 2 and "generate --compare needs --adapter" in refused.output


def test_an_adapter_written_by_mlx_lm_lora_on_every_layer_is_used(trained_run, tiny_model, tmp_path):
    """mlx_lm.lora writes its arguments as adapter_config.json; `--num-layers -1` (every layer) is
    written as -1, which mlx-lm reads as every layer, and so must we."""
    plain = tmp_path / "mlx-lm-adapter"
    plain.mkdir()
    shutil.copy(trained_run / "adapters.safetensors", plain)
    (plain / "adapter_config.json").write_text(json.dumps({
        "model": str(tiny_model), "train": True, "fine_tune_type": "lora", "optimizer": "adam",
        "data": "data/", "seed": 0, "num_layers": -1, "batch_size": 4, "iters": 8, "val_batches": 25,
        "learning_rate": 2e-2, "steps_per_report": 10, "steps_per_eval": 200, "resume_adapter_file": None,
        "adapter_path": str(plain), "save_every": 100, "test": False, "max_seq_length": 512,
        "grad_checkpoint": False, "lr_schedule": None, "mask_prompt": False,
        "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 2.0,
                            "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}}))
    ours = run("generate", "--model", str(tiny_model), "--adapter", str(trained_run), "--max-tokens", "8", "hi")
    theirs = run("generate", "--model", str(tiny_model), "--adapter", str(plain), "--max-tokens", "8", "hi")
    assert theirs.exit_code == 0, theirs.output
    assert theirs.output.split(" s\n", 1)[1] == ours.output.split(" s\n", 1)[1]
    verified = run("adapters", "verify", str(plain), "--model", str(tiny_model))
    assert verified.exit_code == 0, verified.output


def _with(**changes):
    """A hand edit of a JSON file: some of its keys replaced."""
    return lambda text: json.dumps({**json.loads(text), **changes})


def _inside(key, **changes):
    """A hand edit of a JSON file: some keys of its object `key` replaced."""
    return lambda text: _with(**{key: {**json.loads(text)[key], **changes}})(text)


DAMAGED_RUNS = {  # name: (file, the hand edit, what the problem line says)
    "rank-inf": ("adapter_config.json", _inside("lora_parameters", rank=float("inf")),
                 "not a LoRA adapter config mlx_surgical can read (OverflowError"),
    "base-path-int": ("adapter_config.json", _inside("base_model", path=5), "base_model.path must be a string, not a whole number"),
    "prompt-length-str": ("adapter_config.json", _inside("prompt", max_seq_length="2048"),
                          "prompt.max_seq_length must be a whole number, not a string"),
    "scale-nan": ("adapter_config.json", _inside("lora_parameters", scale=float("nan")),
                  "lora_parameters.scale is nan, not a finite number"),
    "rank-zero": ("adapter_config.json", _inside("lora_parameters", rank=0),
                  "lora_parameters.rank is 0, not a positive whole number"),
    "prompt-format": ("adapter_config.json", _inside("prompt", format="alpaca"),
                      "prompt.format is 'alpaca', not one of auto, chat_template, llama2"),
    "fingerprint": ("adapter_config.json", _inside("base_model", fingerprint="0" * 16),
                    "base_model.fingerprint does not match the shape recorded beside it"),
    "data-empty": ("run.json", _with(data={}), "run.json: data.hash must be a string, not missing"),
    "best-str": ("run.json", _with(best="x"), "run.json: best must be an object, not a string"),
    "final-list": ("run.json", _with(final=[1]), "run.json: final must be an object, not a list"),
    "created-int": ("run.json", _with(created=5), "run.json: created must be a string"),
    "val-loss-str": ("run.json", _with(best={"val_loss": "x"}), "run.json: best.val_loss must be a number"),
    "parameters-str": ("run.json", _with(trainable_parameters="many"),
                       "run.json: trainable_parameters must be a whole number"),
    "checksums-list": ("run.json", _with(checksums=["a"]), "run.json: checksums must be an object"),
    "lr-changes": ("run.json", _with(learning_rate_changes=[{"x": 1}]),
                   "run.json: learning_rate_changes[0].update must be a whole number, not missing"),
    "not-an-object": ("run.json", lambda text: "[]", "run.json: not a run record"),
    "truncated": ("run.json", lambda text: text[:40], "malformed JSON"),
}


@pytest.mark.parametrize("damaged", DAMAGED_RUNS)
def test_a_damaged_run_is_listed_as_damaged_and_the_others_still_work(trained_run, tmp_path, damaged):
    file, damage, problem = DAMAGED_RUNS[damaged]
    root, run_dir = copy_run(trained_run, tmp_path)
    shutil.copytree(run_dir, root / "broken")
    (root / "broken" / file).write_text(damage((root / "broken" / file).read_text()))

    listed = run("adapters", "--root", str(root), "list", "--json")
    assert listed.exit_code == 0, listed.output
    by_name = {e["name"]: e for e in json.loads(listed.output)}
    assert by_name[run_dir.name]["status"] == "succeeded" and by_name[run_dir.name]["problems"] == []
    [line] = by_name["broken"]["problems"]
    assert by_name["broken"]["status"] == "damaged" and problem in line and str(root / "broken" / file) in line
    table = run("adapters", "--root", str(root), "list")
    assert table.exit_code == 0 and f"damaged: {line}" in table.output
    for command in ("show", "verify"):
        assert run("adapters", "--root", str(root), command, run_dir.name).exit_code == 0
        missing = run("adapters", "--root", str(root), command, "nope")
        assert missing.exit_code == 2 and "not found" in missing.output and "broken" in missing.output
        refused = run("adapters", "--root", str(root), command, "broken")
        assert refused.exit_code == (0 if command == "show" else 2), refused.output
        assert command == "show" or f"error: {line}" in refused.output


def test_verify_hashes_nothing_outside_the_run_and_no_directory(trained_run, tmp_path):
    root, run_dir = copy_run(trained_run, tmp_path)
    outside = tmp_path / "secret"
    outside.write_text("x")
    info = run_dir / "run.json"
    for name in ("../../secret", str(outside)):  # a match would tell a server's caller the file exists
        info.write_text(_with(checksums={name: sha256_file(outside)})(info.read_text()))
        refused = run("adapters", "--root", str(root), "verify", run_dir.name)
        assert refused.exit_code == 2 and f"'{name}' is not a file inside the run directory" in refused.output
    shutil.copy(trained_run / "run.json", info)
    (run_dir / "adapters.safetensors").unlink()
    (run_dir / "adapters.safetensors").mkdir()
    refused = run("adapters", "--root", str(root), "verify", run_dir.name)
    assert refused.exit_code == 2 and "adapters.safetensors: is a directory, not a file" in refused.output


def test_verify_follows_no_link_out_of_the_run(trained_run, tmp_path):
    root, run_dir = copy_run(trained_run, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(run_dir / "adapters.safetensors", outside)
    (run_dir / "adapters.safetensors").symlink_to(outside)
    refused = run("adapters", "--root", str(root), "verify", run_dir.name)
    assert refused.exit_code == 2, refused.output
    assert "adapters.safetensors: a link leading outside the run directory" in refused.output
    looped = run_dir / "best" / "adapters.safetensors"  # listed in run.json's checksums
    looped.unlink()
    looped.symlink_to(looped)
    refused = run("adapters", "--root", str(root), "verify", run_dir.name)
    assert refused.exit_code == 2 and "best/adapters.safetensors: missing" in refused.output, refused.output


def test_a_name_longer_than_the_file_system_allows_is_not_found(trained_run, tmp_path):
    root, _ = copy_run(trained_run, tmp_path)
    for command in ("show", "verify", "rm"):
        missing = run("adapters", "--root", str(root), command, "x" * 300)
        assert missing.exit_code == 2 and "not found" in missing.output, missing.output
