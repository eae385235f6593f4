"""convert (offline, on the tiny model) and plan (exact counts, JSON, inline examples)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_surgical.cli import cli
from mlx_surgical.config import config_from_dict, preset_path
from mlx_surgical.convert import convert_model
from mlx_surgical.errors import UserError
from mlx_surgical.backend import on_cpu_backend
from mlx_surgical.model import load_model
from mlx_surgical.plan import format_plan, plan_run

IDS = mx.array([[1, 366, 480, 492, 511, 475, 469, 402, 268, 305, 366, 486, 480, 436, 290, 274]])


def relative_rms(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {bits: convert_model(str(tiny_model), root / f"q{bits}", bits=bits, dtype="float32") for bits in (4, 8)}


@pytest.mark.parametrize("bits, tolerance", [(8, 0.03), (4, 0.35)])
def test_converted_model_loads_and_stays_close(tiny_model, quantized, bits, tolerance):
    # Measured relative RMS logit error on the tiny model (seed 0): 0.015 at 8 bits, 0.24 at 4 bits;
    # a random 64-wide model has no outlier structure, so 4-bit rounding shows fully.
    loaded = load_model(str(quantized[bits]))
    assert loaded.shape.quant_bits == bits and loaded.shape.quant_group_size == 64
    provenance = json.loads((quantized[bits] / "provenance.json").read_text())
    assert provenance["source"] == str(tiny_model) and provenance["bits"] == bits
    reference = np.array(load_model(str(tiny_model)).model(IDS))
    error = relative_rms(np.array(loaded.model(IDS)), reference)
    assert error < tolerance
    assert loaded.shape.fingerprint() == load_model(str(tiny_model)).shape.fingerprint()


def test_convert_refuses_existing_output_and_non_llama_models(tiny_model, quantized, tmp_path):
    with pytest.raises(UserError, match="already exists"):
        convert_model(str(tiny_model), quantized[4])
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    result = CliRunner().invoke(cli, ["convert", str(gpt2), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "model_type is 'gpt2'" in result.output
    assert not (tmp_path / "out").exists()


def test_qlora_trains_on_the_4bit_base_and_fuses(quantized, tmp_path):
    from conftest import short_config

    from mlx_surgical.eval import evaluate_adapter
    from mlx_surgical.export import export_adapter
    from mlx_surgical.pipeline import train_run
    from mlx_surgical.surgery import load_with_adapter

    run = train_run(short_config(quantized[4], tmp_path, iters=8, learning_rate=2e-2), progress=False,
                    log=lambda _: None)
    report = evaluate_adapter(run.run_dir, overrides={"max_tokens": 8, "generations": 1}, log=lambda _: None)
    learned = report["learned"]
    assert learned["adapted"]["loss"] < learned["base"]["loss"] - 0.05, learned  # the 4-bit base's adapter learned
    adapted = np.array(load_with_adapter(str(quantized[4]), run.run_dir).model(IDS))
    assert np.abs(adapted - np.array(load_model(str(quantized[4])).model(IDS))).max() > 0.1
    fused = export_adapter(run.run_dir, "fused", tmp_path / "fused", dequantize=True)
    config = json.loads((fused / "config.json").read_text())
    assert "quantization" not in config
    # Tolerance: the fused weight is the dequantized base plus the update, in float32.
    np.testing.assert_allclose(np.array(load_model(str(fused)).model(IDS)), adapted, atol=1e-4)


def inline_config(preset: str, examples: int, path: str | None = None) -> dict:
    raw = json.loads(preset_path(preset).read_text())
    raw["model"]["path"] = path or raw["model"]["path"]
    raw["data"] = {"examples": [{"instruction": f"task {i}", "response": "done"} for i in range(examples)]}
    return raw


def test_plan_for_codellama_7b_before_download():
    plan = plan_run(config_from_dict(inline_config("surgical", 116)))  # models/CodeLlama-7b-Instruct-hf-4bit
    assert plan["model"]["from"] == "built-in table"
    assert plan["trainable_parameters"] == 6_291_456
    assert plan["adapter_size_bytes"] == {"float32": 25_165_824, "float16": 12_582_912}
    assert plan["schedule"]["updates"] == 725 and plan["schedule"]["warmup_updates"] == 50
    assert plan["time"]["total_seconds"] is None and "unknown" in plan["time"]["note"]
    memory = plan["memory"]
    assert 3.0 < memory["base_weights_gb"] < 4.5  # 4-bit CodeLlama-7B is about 3.8 GB
    assert memory["activations_checkpointed_gb"] < memory["activations_gb"]
    nuclear = plan_run(config_from_dict(inline_config("nuclear", 116)))
    table = format_plan(plan, nuclear, ("surgical", "nuclear")).splitlines()
    assert max(map(len, table)) <= 120 and "q/k/v/o/gate/up/down projections" in "\n".join(table)
    assert len(table) > len(format_plan(plan).splitlines())  # long values wrap within their column
    unquantized = inline_config("surgical", 116, "codellama/CodeLlama-7b-Instruct-hf")
    auto = plan_run(config_from_dict(unquantized))
    unquantized["model"]["dtype"] = "float16"
    float16 = plan_run(config_from_dict(unquantized))
    assert 13.0 < float16["memory"]["base_weights_gb"] < 14.0  # 6.7B parameters x 2 bytes
    # dtype auto trains in float32 on MLX's CPU backend, the stored float16 on Metal.
    bytes_per_weight = 4 if on_cpu_backend() else 2
    assert auto["memory"]["base_weights_gb"] == pytest.approx(float16["memory"]["base_weights_gb"] * bytes_per_weight / 2)


def test_plan_shows_the_per_rank_share_of_the_global_batch():
    raw = inline_config("surgical", 116)
    raw["training"]["batch_size"] = 4
    one, two = (plan_run(config_from_dict(raw), ranks=n) for n in (1, 2))
    assert two["batch"] == {"global": 4, "ranks": 2, "per_rank": 2, "accumulation_steps": 4, "examples_per_update": 16}
    assert two["schedule"]["updates"] == one["schedule"]["updates"]
    # Each rank holds half the batch, and ranks never pair their micro-batches (one process would).
    assert two["memory"]["micro_batches_at_once"] == 1
    assert one["memory"]["micro_batches_at_once"] == (2 if on_cpu_backend() else 1)
    assert two["memory"]["activations_gb"] == pytest.approx(
        one["memory"]["activations_gb"] / 2 / one["memory"]["micro_batches_at_once"], rel=0.05)
    with pytest.raises(UserError, match="does not split evenly over 3 ranks"):
        plan_run(config_from_dict(raw), ranks=3)


def test_plan_compare_and_json_through_the_cli(tmp_path):
    surgical, nuclear = tmp_path / "surgical.json", tmp_path / "nuclear.json"
    surgical.write_text(json.dumps(inline_config("surgical", 116)))
    nuclear.write_text(json.dumps(inline_config("nuclear", 116)))
    result = CliRunner().invoke(cli, ["plan", str(surgical), "--compare", str(nuclear), "--json"])
    assert result.exit_code == 0, result.output
    both = json.loads(result.output)
    assert both["surgical"]["trainable_parameters"] == 6_291_456
    assert both["nuclear"]["trainable_parameters"] == 32 * 32 * (3 * (4096 + 4096) + 4096 + 4096 + 3 * (4096 + 11008))
    assert both["nuclear"]["schedule"]["updates"] == 2900
    text = CliRunner().invoke(cli, ["plan", str(surgical), "--compare", str(nuclear)]).output
    assert "6,291,456" in text and "trainable parameters" in text
    (tmp_path / "other").mkdir()
    namesake = tmp_path / "other" / "surgical.json"
    namesake.write_text(nuclear.read_text())
    for other, keys in ((namesake, [str(surgical), str(namesake)]), (surgical, [str(surgical), f"{surgical} (again)"])):
        same_name = CliRunner().invoke(cli, ["plan", str(surgical), "--compare", str(other), "--json"])
        assert list(json.loads(same_name.output)) == keys  # two columns, not one


def test_plan_on_a_local_model_matches_training(make_config):
    from mlx_surgical.pipeline import train_run

    config = make_config(iters=3)
    plan = plan_run(config, probe=True)
    assert plan["model"]["from"] == "config.json"
    assert plan["time"]["seconds_per_update"] > 0
    run = train_run(config, progress=False, log=lambda _: None)
    assert run.trainable_parameters == plan["trainable_parameters"]
    assert json.loads((run.run_dir / "run.json").read_text())["schedule"]["updates"] == plan["schedule"]["updates"]


def test_convert_writes_what_trains_fastest_on_this_backend_and_says_so(tiny_model, tmp_path):
    out = tmp_path / "q4"
    result = CliRunner().invoke(cli, ["convert", str(tiny_model), "--out", str(out)])
    assert result.exit_code == 0, result.output
    dtype = "float32" if on_cpu_backend() else "float16"
    assert json.loads((out / "provenance.json").read_text())["dtype"] == dtype
    assert load_model(str(out)).model.model.norm.weight.dtype == getattr(mx, dtype)
    assert ("writing the unquantized parts in float32" in result.output) == on_cpu_backend()


def test_plan_says_why_there_is_no_time_and_when_a_run_does_not_fit(make_config):
    config = make_config(iters=3)
    assert plan_run(config, probe=False)["time"]["note"] == "not measured: the timing probe was skipped (--no-probe)"
    config.training.batch_size = 10 ** 7  # activations far beyond any machine's memory
    plan = plan_run(config)
    assert plan["memory"]["fits"] is False and plan["time"]["seconds_per_update"] is None
    assert plan["time"]["note"] == "not measured: the run does not fit this machine's memory"
    assert "DOES NOT FIT" in format_plan(plan)


def test_plan_on_two_ranks_with_a_batch_of_one_says_what_to_set():
    with pytest.raises(UserError) as refused:
        plan_run(config_from_dict(inline_config("surgical", 116)), ranks=2)
    assert refused.value.problems == [
        "--ranks: the global batch of 1 does not split evenly over 2 ranks (each takes batch_size / 2 examples); "
        "set training.batch_size to 2 and training.grad_accumulation_steps to 2, which keeps 4 examples per update"]


def test_plan_names_a_slow_path_before_the_probe():
    raw = inline_config("surgical", 116, "codellama/CodeLlama-7b-Instruct-hf")
    raw["model"]["dtype"] = "float16"
    said = []
    plan = plan_run(config_from_dict(raw), log=said.append)
    if on_cpu_backend():
        assert any("model.dtype is float16" in line and "30x" in line for line in said)
    assert said == [f"warning: {w}" for w in plan["warnings"]]
