"""Every export format, loaded back by the tool that consumes it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

from mlx_surgical.backend import on_cpu_backend
from mlx_surgical.convert import convert_model
from mlx_surgical.errors import UserError
from mlx_surgical.export import export_adapter
from mlx_surgical.adapter import read_adapter
from mlx_surgical.surgery import load_with_adapter
from mlx_surgical.model import load_model

PROMPT_IDS = [1, 366, 480, 492, 511, 475, 469, 402, 268, 305, 366, 486, 480, 436, 290, 274]


def adapted_logits(tiny_model, run_dir) -> np.ndarray:
    loaded = load_with_adapter(str(tiny_model), run_dir)
    return np.array(loaded.model(mx.array([PROMPT_IDS])))


def test_mlx_export_is_clean_and_loads_in_mlx_lm(trained_run, tiny_model, tmp_path):
    from mlx_lm.utils import load

    out = export_adapter(trained_run, "mlx", tmp_path / "mlx")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    model, _ = load(str(tiny_model), adapter_path=str(out))
    np.testing.assert_array_equal(np.array(model(mx.array([PROMPT_IDS]))), adapted_logits(tiny_model, trained_run))
    with pytest.raises(UserError, match="already exists"):
        export_adapter(trained_run, "mlx", out)


def logits_in_peft(base_dir: Path, export: Path) -> tuple[np.ndarray, set[str]]:
    """The PEFT export on the base in transformers + peft: logits of PROMPT_IDS, LoRA parameter names."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(export)).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT_IDS])).logits.numpy()
    return logits, {n for n, _ in model.named_parameters() if "lora_" in n}


def test_peft_export_loads_in_real_peft_with_the_same_logits(trained_run, tiny_model, tmp_path):
    out = export_adapter(trained_run, "peft", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert "layers_to_transform" not in config

    peft_logits, names = logits_in_peft(tiny_model, out)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names
    mlx_logits = adapted_logits(tiny_model, trained_run)
    base_logits = np.array(load_model(str(tiny_model)).model(mx.array([PROMPT_IDS])))
    assert np.abs(mlx_logits - base_logits).max() > 1e-3  # the adapter changes the output
    # Tolerance: float32 on both sides, different matmul order; measured max difference ~3e-6.
    np.testing.assert_allclose(peft_logits, mlx_logits, atol=1e-4)


def test_peft_export_of_last_layers_names_them(make_config, tiny_model, tmp_path):
    from mlx_surgical.pipeline import train_run

    config = make_config(iters=4, learning_rate=2e-2)
    config.lora.layers = 1
    run = train_run(config, progress=False, log=lambda _: None).run_dir
    out = export_adapter(run, "peft", tmp_path / "peft-last")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    peft_logits, names = logits_in_peft(tiny_model, out)
    assert names and all(".layers.1." in name for name in names)
    mlx_logits = adapted_logits(tiny_model, run)
    assert np.abs(mlx_logits - np.array(load_model(str(tiny_model)).model(mx.array([PROMPT_IDS])))).max() > 1e-3
    np.testing.assert_allclose(peft_logits, mlx_logits, atol=1e-4)


def llama_cpp_row_order(rows: int, heads: int) -> list[int]:
    """llama.cpp's q/k row order written out index by index: within each head of d rows, new
    row 2i+j is old row j*d/2+i."""
    d = rows // heads
    return [h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)]


def test_gguf_export_has_llama_cpp_names_metadata_and_permutation(trained_run, tmp_path):
    import gguf

    out = export_adapter(trained_run, "gguf", tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(str(out))
    fields = {name: reader.fields[name] for name in reader.fields}

    def value(name):
        field = fields[name]
        return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]]

    assert value("general.architecture") == "llama"
    assert value("general.type") == "adapter"
    assert value("adapter.type") == "lora"
    assert float(value("adapter.lora.alpha")) == 16.0
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    adapter = read_adapter(trained_run)
    shape = adapter.config.base_shape()
    assert len(adapter.pairs) == 3 * shape.num_layers and len(tensors) == 2 * len(adapter.pairs)  # q, k, v everywhere
    for pair in adapter.pairs:
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}[pair.projection]
        a = tensors[f"blk.{pair.layer}.{name}.weight.lora_a"]
        b = tensors[f"blk.{pair.layer}.{name}.weight.lora_b"]
        assert a.shape == (8, shape.hidden_size) and b.shape == (pair.b.shape[1], 8)
        delta = pair.delta(adapter.config.scale)  # (out, in), Hugging Face row order
        heads = {"q_proj": shape.num_heads, "k_proj": shape.num_kv_heads}.get(pair.projection)
        expected = delta[llama_cpp_row_order(delta.shape[0], heads)] if heads else delta
        np.testing.assert_allclose(adapter.config.scale * b @ a, expected, atol=1e-6)


def llama_cpp_checkout():
    """llama.cpp's source (the vendor/llama.cpp folder of the llama-cpp-python sdist), named by
    LLAMA_CPP_DIR, for its own converters."""
    path = Path(os.environ.get("LLAMA_CPP_DIR", "/nonexistent"))
    if not (path / "convert_hf_to_gguf.py").exists():
        pytest.skip("set LLAMA_CPP_DIR to llama.cpp's source to run llama.cpp's converters")
    return path


def test_llama_cpp_applies_the_gguf_adapter_like_mlx(trained_run, tiny_model, tmp_path):
    """The real consumer: llama.cpp (through llama-cpp-python) loads a base converted by
    llama.cpp's own converter, then our adapter. Skipped where llama-cpp-python is not
    installed: it compiles from source for about 20 minutes, too long for every CI run."""
    llama_cpp = pytest.importorskip("llama_cpp")
    source = llama_cpp_checkout()
    base_gguf = tmp_path / "base.gguf"
    subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(tiny_model), "--outfile",
                    str(base_gguf), "--outtype", "f32"], check=True, capture_output=True)
    adapter_gguf = export_adapter(trained_run, "gguf", tmp_path / "adapter.gguf")

    def llama_cpp_logits(**kwargs):
        llm = llama_cpp.Llama(model_path=str(base_gguf), n_ctx=64, logits_all=True, verbose=False, **kwargs)
        llm.eval(PROMPT_IDS)
        return np.array(llm.scores[:len(PROMPT_IDS)])

    mlx_base = np.array(load_model(str(tiny_model)).model(mx.array([PROMPT_IDS])))[0]
    mlx_adapted = adapted_logits(tiny_model, trained_run)[0]
    plain, with_adapter = llama_cpp_logits(), llama_cpp_logits(lora_path=str(adapter_gguf))
    assert np.abs(with_adapter - plain).max() > 1e-2
    # Tolerance: llama.cpp's float32 CPU kernels against MLX's; measured max difference ~3e-3 on logits
    # of magnitude ~5, while the adapter moves them by ~5.
    np.testing.assert_allclose(plain, mlx_base, atol=5e-3)
    np.testing.assert_allclose(with_adapter, mlx_adapted, atol=5e-3)


def test_gguf_export_equals_llama_cpps_own_conversion_of_the_peft_export(trained_run, tiny_model, tmp_path):
    import gguf

    source = llama_cpp_checkout()
    pytest.importorskip("torch")
    peft_dir = export_adapter(trained_run, "peft", tmp_path / "peft")
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([sys.executable, str(source / "convert_lora_to_gguf.py"), str(peft_dir), "--base", str(tiny_model),
                    "--outfile", str(theirs), "--outtype", "f32"], check=True, capture_output=True)
    ours = export_adapter(trained_run, "gguf", tmp_path / "ours.gguf")
    read = lambda path: {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    theirs_tensors, ours_tensors = read(theirs), read(ours)
    assert theirs_tensors.keys() == ours_tensors.keys()
    for name in ours_tensors:
        np.testing.assert_allclose(ours_tensors[name], theirs_tensors[name], atol=1e-7, err_msg=name)


def test_fused_model_matches_base_plus_adapter(trained_run, tiny_model, tmp_path):
    from mlx_lm.utils import load

    out = export_adapter(trained_run, "fused", tmp_path / "fused")
    model, tokenizer = load(str(out))
    assert tokenizer.encode("def f():") == load_model(str(tiny_model)).tokenizer.encode("def f():")
    # Tolerance: W + s*B^T A^T is rounded once to float32; measured max difference ~4e-6.
    np.testing.assert_allclose(np.array(model(mx.array([PROMPT_IDS]))), adapted_logits(tiny_model, trained_run),
                               atol=1e-4)


def test_a_float16_base_computes_in_float32_on_the_cpu_and_fuses_in_float16(trained_run, tiny_model, tmp_path):
    """model.dtype 'auto': evaluation and generation compute in the dtype training used (float32
    on MLX's CPU backend, 30x faster there than float16), while a fused export keeps the base's."""
    from mlx.utils import tree_flatten

    half = convert_model(str(tiny_model), tmp_path / "half", bits=None, dtype="float16", progress=False,
                         log=lambda _: None)
    loaded = load_with_adapter(str(half), trained_run)
    computing = {v.dtype for _, v in tree_flatten(loaded.model.parameters())}
    assert computing == ({mx.float32} if on_cpu_backend() else {mx.float16}), computing
    fused = export_adapter(trained_run, "fused", tmp_path / "fused", base_model=str(half))
    with safe_open(str(fused / "model.safetensors"), "numpy") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {np.dtype("float16")}


def test_adapter_refuses_a_base_model_of_another_shape(trained_run, other_tiny_model):
    with pytest.raises(UserError, match=r"trained on .*tiny-llama .*not on .*other"):
        load_with_adapter(str(other_tiny_model), trained_run)


def test_unknown_format_and_missing_adapter_are_refused(trained_run, tmp_path):
    with pytest.raises(UserError, match="unknown format"):
        export_adapter(trained_run, "onnx")
    with pytest.raises(UserError, match="not an adapter directory"):
        export_adapter(tmp_path, "peft", tmp_path / "x")


def test_peft_export_of_a_converted_base_loads_with_auto_peft(tiny_model, tmp_path):
    """The base trained on is an MLX conversion, which transformers cannot load: the export
    names the Hugging Face model it was converted from, so AutoPeftModelForCausalLM finds it."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from click.testing import CliRunner
    from conftest import short_config

    from mlx_surgical.cli import cli
    from mlx_surgical.pipeline import train_run

    converted = tmp_path / "tiny-mlx"
    result = CliRunner().invoke(cli, ["convert", str(tiny_model), "--bits", "none", "--out", str(converted)])
    assert result.exit_code == 0, result.output
    run = train_run(short_config(converted, tmp_path / "adapters", iters=3, learning_rate=2e-2), progress=False,
                    log=lambda _: None).run_dir
    out = export_adapter(run, "peft", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model).resolve())

    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        peft_logits = model(torch.tensor([PROMPT_IDS])).logits.numpy()
    np.testing.assert_allclose(peft_logits, adapted_logits(converted, run), atol=1e-4)


def test_force_replaces_an_earlier_export_only(trained_run, tiny_model, tmp_path, monkeypatch):
    """--force must never take the run it reads, a folder holding it, or something that is not an
    earlier output of the same kind: each is refused with nothing touched."""
    from click.testing import CliRunner

    from mlx_surgical.cli import cli

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    shutil.copytree(trained_run, runs / "run")
    (tmp_path / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    refusals = {
        ("export", "runs/run", "--format", "mlx", "--out", "runs"): "runs: holds runs/run, which this command reads",
        ("export", "runs/run", "--format", "peft", "--out", "runs/run"): "runs/run: is runs/run",
        ("export", "runs/run", "--format", "gguf", "--out", "runs"): "runs: holds runs/run",
        ("convert", str(tiny_model), "--out", "notes.txt"): "--force replaces an earlier output only, and this is a file",
    }
    for command, words in refusals.items():
        result = CliRunner().invoke(cli, [*command, "--force"])
        assert result.exit_code == 2 and words in result.output, (command, result.output)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "notes.txt").read_text() == "mine"

    export = ["export", "runs/run", "--format", "mlx", "--out", "export"]
    assert CliRunner().invoke(cli, export).exit_code == 0
    again = CliRunner().invoke(cli, [*export, "--force"])
    assert again.exit_code == 0 and (tmp_path / "export" / "adapters.safetensors").exists()
    as_gguf = CliRunner().invoke(cli, ["export", "runs/run", "--format", "gguf", "--out", "export", "--force"])
    assert as_gguf.exit_code == 2 and "replaces an earlier output file only, and this is a folder" in as_gguf.output
