import dataclasses
import json

import pytest

from mlx_surgical.config import SECTIONS, RunConfig, config_from_dict, help_lines, load_config, preset_names, preset_path
from mlx_surgical.data import read_records
from mlx_surgical.errors import UserError

MINIMAL = {"model": {"path": "m"}, "data": {"examples": [{"instruction": "a", "response": "b"}]}}


def problems_of(raw) -> list[str]:
    with pytest.raises(UserError) as err:
        config_from_dict(raw, source="c.json")
    return err.value.problems


def test_defaults_are_the_surgical_recipe():
    c = config_from_dict(MINIMAL)
    assert (c.lora.rank, c.lora.alpha, c.lora.dropout) == (8, 16.0, 0.05)
    assert c.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert c.lora.scale == 2.0
    assert (c.training.learning_rate, c.training.batch_size, c.training.grad_accumulation_steps) == (1e-4, 1, 4)
    assert (c.training.warmup_steps, c.training.schedule, c.training.weight_decay) == (50, "cosine", 0.01)


def test_every_problem_is_reported_at_once_with_its_field():
    raw = {
        "model": {"path": "m", "colour": "red"},
        "lora": {"rank": 0, "dropout": 1.5, "target_modules": ["q_proj", "qq_proj"]},
        "training": {"lerning_rate": 1e-4, "batch_size": "four", "epochs": 2, "iters": 5},
        "data": {},
        "extra": {},
    }
    found = problems_of(raw)
    text = "\n".join(found)
    assert "c.json: model.colour: unknown key" in text
    assert "training.lerning_rate: unknown key; did you mean 'learning_rate'?" in text
    assert "training.batch_size: expected an integer" in text
    assert "lora.rank: must be at least 1" in text
    assert "lora.dropout: must be in [0, 1)" in text
    assert "unknown projection 'qq_proj'" in text
    assert "set training.epochs or training.iters, not both" in text
    assert "c.json: extra: unknown key" in text
    assert "give training data" in text
    assert len(found) >= 9
    assert all("\n" not in p for p in found)


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"model": {"path": "m"},\n  "lora": {rank: 8}}')
    with pytest.raises(UserError, match=r"bad.json:2:\d+: malformed JSON"):
        load_config(path)


def test_data_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.json"
    path.write_text(json.dumps({"model": {"path": "m"}, "data": {"train": "train.jsonl"}}))
    # A missing file alone is left to the stage that reads the data (validate names it with the model's problems).
    assert load_config(path).data.train == str(tmp_path / "sub" / "train.jsonl")


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_loads(name):
    config = load_config(preset_path(name))
    assert config.model.path


def test_presets_ship_the_documented_recipes():
    surgical = load_config(preset_path("surgical"))
    assert (surgical.lora.rank, surgical.lora.alpha, surgical.lora.dropout) == (8, 16.0, 0.05)
    assert surgical.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert (surgical.training.epochs, surgical.training.learning_rate, surgical.training.warmup_steps) == (25, 1e-4, 50)
    nuclear = load_config(preset_path("nuclear"))
    assert (nuclear.lora.rank, nuclear.lora.alpha, nuclear.training.epochs) == (32, 64.0, 100)
    assert len(nuclear.lora.target_modules) == 7


def test_help_lists_every_setting_with_its_default():
    """Every field of every section, under its section, with the default a config gets when it
    leaves the field out, and a help text."""
    lines = help_lines()
    defaults = RunConfig()
    for section, kind in SECTIONS.items():
        start = lines.index(f"[{section}]")
        block = lines[start + 1:next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))]
        for field in dataclasses.fields(kind):
            default = getattr(getattr(defaults, section), field.name)
            entry = next((line for line in block if line.startswith(f"  {field.name} = ")), None)
            assert entry is not None, f"{section}.{field.name} is not listed"
            shown, help_text = entry.split("\n      ")
            assert shown == f"  {field.name} = {json.dumps(default)}" and help_text.strip(), entry
    assert "  grad_accumulation_steps = 4" in "\n".join(lines)


def test_a_config_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b'{\n"description": "caf\xe9"\n}')
    with pytest.raises(UserError, match=r"c.json:2: not valid UTF-8 \(byte 0xe9 at column 20\)"):
        load_config(path)


def test_model_path_is_taken_from_the_config_folder_unless_it_exists_from_the_working_directory(
        tiny_model, tmp_path, monkeypatch):
    (tmp_path / "project" / "models").mkdir(parents=True)
    (tmp_path / "project" / "models" / "tiny").symlink_to(tiny_model)
    path = tmp_path / "project" / "config.json"
    path.write_text(json.dumps({**MINIMAL, "model": {"path": "models/tiny"}}))
    monkeypatch.chdir(tmp_path)
    assert load_config(path).model.path == str(tiny_model.resolve())  # beside the config, like data paths
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_model)
    assert load_config(path).model.path == "models/tiny"  # as before: it exists from here


def test_eval_settings_get_the_same_number_checks_as_training():
    found = "\n".join(problems_of({"model": {"path": "m"}, "data": {"train": "t.jsonl", "valid": "v.jsonl"},
                                   "eval": {"seed": -1, "timeout_seconds": float("inf"), "memory_mb": 2 ** 40,
                                            "temperature": float("nan")}}))
    assert "eval.seed: must be in [0, 2^64)" in found
    assert "eval.timeout_seconds: must be a finite number" in found
    assert "eval.memory_mb: must be below 2^31" in found
    assert "eval.temperature: must be a finite number" in found


def test_a_missing_data_file_is_reported_with_a_mistyped_key(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"path": "m"}, "data": {"train": "nope.jsonl"},
                                "training": {"learnig_rate": 1e-4}}))
    with pytest.raises(UserError) as refused:
        load_config(path)
    assert [p.split(": ")[1] for p in refused.value.problems] == ["training.learnig_rate", "data.train"]
    assert refused.value.problems[1] == (f"{path}: data.train: {tmp_path / 'nope.jsonl'}: data file not found (a "
                                         "relative path is taken from the config file's folder)")


def test_data_file_names_are_checked_with_everything_else():
    found = problems_of({"model": {"path": "m"}, "lora": {"rnak": 8},
                         "data": {"train": "bundled:trian", "valid": "held\0out.jsonl"}})
    assert any(p.startswith("c.json: lora.rnak: unknown key") for p in found)
    assert "c.json: data.train: unknown bundled split 'trian'; use bundled:train, bundled:valid, bundled:test" in found
    assert "c.json: data.valid: the path contains a NUL character; give the file's name as plain text" in found


def test_a_config_and_a_json_data_file_saved_with_a_bom_are_read(tmp_path):
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"instruction": "a", "response": "b"}]).encode())
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"model": {"path": "m"}, "data": {"train": "d.json"}}).encode())
    assert read_records(load_config(path).data.train)[0].fields == {"instruction": "a", "response": "b"}
