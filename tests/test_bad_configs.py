"""Every way a config, its model or its output location can be wrong ends in one clear line from
`validate` and the same from `train`: exit status 2, never a traceback."""

import json
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import free_port

from mlx_surgical.cli import cli
from mlx_surgical.data import sample_path


def write_config(tmp_path: Path, model, **sections) -> Path:
    raw = {"model": {"path": str(model)}, "data": {"train": str(sample_path("train"))},
           "training": {"iters": 2, "max_seq_length": 512}, "output": {"dir": str(tmp_path / "adapters")}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def broken_model(tmp_path: Path, tiny_model: Path, damage) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    damage(model)
    return model


def edited_config(**changes):
    """A hand edit of a model's config.json: some keys replaced."""
    def edit(model: Path):
        path = model / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def nested(depth: int) -> str:
    return '{"model": ' * depth + "1" + "}" * depth


def cut(path: Path):
    path.write_bytes(path.read_bytes()[:-100])


# name -> (build(tmp_path, tiny_model) -> config path, the words the error must contain)
CASES = {
    "model.path is a file": (lambda t, m: write_config(t, m / "config.json"), "config.json is a file"),
    "model folder missing": (lambda t, m: write_config(t, "models/CodeLlama-7b-hf-4bit"),
                             "models/CodeLlama-7b-hf-4bit does not exist"),
    "model folder missing, hint": (lambda t, m: write_config(t, "./models/x"),
                                   "mlx-surgical convert SOURCE --out models/x` (SOURCE: its Hugging Face repo id or GGUF file)"),
    "a preset's folder missing, its command": (
        lambda t, m: write_config(t, "models/CodeLlama-7b-Instruct-hf-8bit"),
        "create it with `mlx-surgical convert codellama/CodeLlama-7b-Instruct-hf --bits 8 --out "
        "models/CodeLlama-7b-Instruct-hf-8bit`"),
    "the real quickstart's folder missing": (
        lambda t, m: write_config(t, "models/SmolLM2-135M-Instruct-float32"),
        "run `mlx-surgical quickstart --real --model-dir models/SmolLM2-135M-Instruct-float32` once"),
    "a typo in the model folder": (lambda t, m: shutil.copytree(m, t / "models" / "tiny-llama") and write_config(
        t, t / "models" / "tiny-lama"), "does not exist (a relative path is looked up from the working directory, then "
        "from the config file's folder); did you mean "),
    "a typo in the data file": (lambda t, m: shutil.copy(sample_path("train"), t / "train.jsonl") and write_config(
        t, m, data={"train": str(t / "trian.jsonl")}), "trian.jsonl: data file not found; check data.train in the config "
        "(did you mean "),
    "config.json malformed": (lambda t, m: write_config(t, broken_model(
        t, m, lambda d: (d / "config.json").write_text('{"model_type": "llama",'))), "config.json:1:24: malformed JSON"),
    "config.json not Llama": (lambda t, m: write_config(t, broken_model(
        t, m, lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((d / "config.json").read_text()), "model_type": "gpt2"})))), "model_type is 'gpt2'"),
    "config.json sizes": (lambda t, m: write_config(t, broken_model(
        t, m, lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((d / "config.json").read_text()), "hidden_size": "wide"})))),
        "hidden_size must be positive whole numbers"),
    "config.json without rms_norm_eps": (lambda t, m: write_config(t, broken_model(
        t, m, lambda d: (d / "config.json").write_text(json.dumps(
            {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "rms_norm_eps"})))),
        "config.json: missing rms_norm_eps"),
    "config.json rope_theta a list": (lambda t, m: write_config(t, broken_model(t, m, edited_config(rope_theta=[1e4]))),
                                      "config.json: rope_theta is [10000.0], not a positive number"),
    "config.json rope_scaling a string": (lambda t, m: write_config(t, broken_model(
        t, m, edited_config(rope_scaling="linear"))), 'config.json: rope_scaling is "linear", not an object'),
    "config.json rope_parameters' theta a string": (lambda t, m: write_config(t, broken_model(
        t, m, edited_config(rope_parameters={"rope_theta": "1e4"}))),
        'config.json: rope_parameters.rope_theta is "1e4", not a positive number'),
    "config.json's two RoPE forms disagree": (lambda t, m: write_config(t, broken_model(
        t, m, edited_config(rope_theta=10000.0, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}))),
        "config.json: rope_theta 10000.0 disagrees with rope_parameters.rope_theta 100000"),
    "weights empty": (lambda t, m: write_config(t, broken_model(
        t, m, lambda d: (d / "model.safetensors").write_bytes(b""))), "model.safetensors: it is not a whole safetensors file"),
    "weights truncated": (lambda t, m: write_config(t, broken_model(
        t, m, lambda d: cut(d / "model.safetensors"))), "(truncated or damaged: "),
    "weights missing": (lambda t, m: write_config(t, broken_model(
        t, m, lambda d: (d / "model.safetensors").unlink())), "no weights (model*.safetensors)"),
    "tokenizer missing": (lambda t, m: write_config(t, broken_model(
        t, m, lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer.model")])), "no tokenizer files"),
    "seed negative": (lambda t, m: write_config(t, m, training={"seed": -1}), "training.seed: must be in [0, 2^64)"),
    "seed too large": (lambda t, m: write_config(t, m, training={"seed": 2 ** 64}), "training.seed: must be in"),
    "rank beyond int32": (lambda t, m: write_config(t, m, lora={"rank": 2 ** 31 + 1}), "lora.rank: must be below 2^31"),
    "rank beyond the model": (lambda t, m: write_config(t, m, lora={"rank": 100}),
                              "lora.rank: 100 exceeds the smallest adapted projection"),
    "iters as a float": (lambda t, m: write_config(t, m, training={"iters": 1e30}), "training.iters: expected an integer"),
    "iters huge": (lambda t, m: write_config(t, m, training={"iters": 10 ** 30}), "training.iters: must be below 2^31"),
    "learning rate infinite": (lambda t, m: write_config(t, m, training={"learning_rate": float("inf")}),
                               "training.learning_rate: must be a finite number"),
    "layers beyond the model": (lambda t, m: write_config(t, m, lora={"layers": 5}),
                                "lora.layers: 5, but"),
    "nested 100,000 deep": (lambda t, m: (t / "deep.json").write_text(nested(100_000)) and t / "deep.json",
                            "JSON nested too deeply"),
    "eval seed negative": (lambda t, m: write_config(t, m, eval={"seed": -1}), "eval.seed: must be in [0, 2^64)"),
    "an answer without a request": (
        lambda t, m: (t / "d.jsonl").write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}))
        and write_config(t, m, data={"train": str(t / "d.jsonl"), "system_prompt": "Be brief."}),
        "d.jsonl:1: no 'user' message before the answer"),
    "a data line nested 100,000 deep": (
        lambda t, m: (t / "d.jsonl").write_text(nested(100_000)) and write_config(t, m, data={"train": str(t / "d.jsonl")}),
        "d.jsonl:1: JSON nested too deeply"),
    "half a character in an example": (
        lambda t, m: (t / "d.jsonl").write_text('{"instruction": "a\\ud800", "response": "b"}\n')
        and write_config(t, m, data={"train": str(t / "d.jsonl")}), "d.jsonl:1: user message: not text at character 2"),
    "half a character in the system prompt": (lambda t, m: write_config(t, m, data={"system_prompt": "a\ud800"}),
                                              "data.system_prompt: not text at character 2 (\\ud800"),
    "a run name too long for a file name": (lambda t, m: write_config(t, m, output={"name": "x" * 300}),
                                            "output.name: use a plain name of at most 128"),
    "a NUL in the output folder": (lambda t, m: write_config(t, m, output={"dir": "a\0b"}),
                                   "output.dir: the path contains a NUL character"),
    "output under a file": (lambda t, m: (t / "file").write_text("") or write_config(t, m, output={"dir": str(t / "file" / "runs")}),
                            "output.dir:"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_bad_config_is_one_clear_line(tiny_model, tmp_path, case, command):
    build, words = CASES[case]
    config = build(tmp_path, tiny_model)
    result = CliRunner().invoke(cli, [command, str(config)] + (["--no-progress"] if command == "train" else []))
    assert result.exit_code == 2, (result.output, result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert any(words in line for line in errors), result.output
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())


@pytest.mark.parametrize("command", ["validate", "train"])
def test_both_splits_problems_are_reported_at_once(tiny_model, tmp_path, command):
    """validate and train read the data with the same code: every split's problem in one go."""
    (tmp_path / "train.jsonl").write_text('{"instruction": "a"}\n')
    (tmp_path / "valid.jsonl").write_text('{"instruction": "a", "response": "b"}\nnot json\n')
    config = write_config(tmp_path, tiny_model, data={"train": str(tmp_path / "train.jsonl"),
                                                     "valid": str(tmp_path / "valid.jsonl")})
    result = CliRunner().invoke(cli, [command, str(config)] + (["--no-progress"] if command == "train" else []))
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 2, result.output
    assert "train.jsonl:1: field 'response'" in errors[0] and "valid.jsonl:2: malformed JSON" in errors[1]


def test_a_prompt_format_the_tokenizer_cannot_write_is_reported_with_the_rest(tiny_model, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"instruction": "a"}\n')
    config = write_config(tmp_path, tiny_model, data={"train": str(tmp_path / "train.jsonl"),
                                                     "prompt_format": "chat_template"})
    result = CliRunner().invoke(cli, ["validate", str(config)])
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 2, result.output
    assert "train.jsonl:1: field 'response'" in errors[0] and "the tokenizer has no chat template" in errors[1]


def test_a_full_disk_is_one_clear_line(tiny_model, tmp_path):
    """The file size limit makes every write past 32 KB fail, as a full disk does."""
    config = write_config(tmp_path, tiny_model, training={"iters": 4, "save_every": 2})  # a 48 KB optimizer state
    script = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, {resource.RLIM_INFINITY}))
        from mlx_surgical.cli import cli
        cli(["train", "--no-progress", {str(config)!r}])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "optimizer.safetensors" not in line and "update-0000002: cannot be written (" in line
    assert "File too large" in line and "check free space and permissions there" in line
    assert "Traceback" not in result.stderr


def test_the_tokenizers_length_warning_does_not_leak(tiny_model, tmp_path):
    model = broken_model(tmp_path, tiny_model, lambda d: (d / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((d / "tokenizer_config.json").read_text()), "model_max_length": 8})))
    config = write_config(tmp_path, model)
    result = subprocess.run([sys.executable, "-m", "mlx_surgical", "validate", str(config)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Token indices sequence length" not in result.stdout + result.stderr


def test_export_of_a_damaged_adapter_is_one_clear_line(trained_run, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_run, damaged)
    cut(damaged / "adapters.safetensors")
    result = CliRunner().invoke(cli, ["export", str(damaged), "--format", "peft"])
    assert result.exit_code == 2 and "adapters.safetensors: cannot be read" in result.output
    for command in (["eval", str(damaged)], ["generate", "--adapter", str(damaged), "hi"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2 and "adapters.safetensors: cannot be read" in result.output, result.output
    shutil.copy(trained_run / "adapters.safetensors", damaged / "adapters.safetensors")
    config = json.loads((damaged / "adapter_config.json").read_text())
    config["base_model"]["config"]["hidden_size"] = "wide"
    (damaged / "adapter_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["export", str(damaged), "--format", "gguf"])
    assert result.exit_code == 2 and "not a LoRA adapter config mlx_surgical can read" in result.output
    for broken in ([], {**config, "prompt": [1]}):
        (damaged / "adapter_config.json").write_text(json.dumps(broken))
        result = CliRunner().invoke(cli, ["export", str(damaged), "--format", "peft"])
        assert result.exit_code == 2 and "adapter_config.json: not a LoRA adapter config" in result.output, result.output


def test_a_config_mistake_is_answered_before_mlx_loads(tmp_path):
    """Reading the config takes a fraction of a second; importing MLX, mlx-lm and transformers
    several seconds: a mistyped key is answered first."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"path": "models/x"}, "data": {"train": "train.jsonl"},
                                  "training": {"lerning_rate": 1e-4}}))
    script = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from mlx_surgical.cli import cli
        for command in (["train"], ["validate"], ["plan"], ["plan", "tiny", "--compare"]):
            result = CliRunner().invoke(cli, [*command, {str(config)!r}])
            assert result.exit_code == 2 and "training.lerning_rate" in result.output, (command, result.output)
        print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm", "transformers"))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported: {result.stdout}"


def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_work(trained_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for command in (["eval", str(trained_run), "--out", str(blocker / "report")], ["tiny-model", str(blocker / "m")]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2 and f"{blocker}/" in result.output and "cannot be written" in result.output, \
            result.output
    served = subprocess.run([sys.executable, "-m", "mlx_surgical", "serve", "--port", str(free_port()), "--workspace",
                             str(blocker / "workspace")], capture_output=True, text=True, timeout=120)
    assert served.returncode == 2 and "cannot be written" in served.stderr and "Traceback" not in served.stderr
