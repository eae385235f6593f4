"""convert from GGUF files and from Ollama's model store (offline, on GGUF files of the tiny
model), and RoPE settings that survive transformers 5's config form.

The reference is transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`), which
dequantizes and undoes llama.cpp's q/k permutation independently of our code."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from gguf_files import write_llama_gguf

from mlx_surgical.cli import cli
from mlx_surgical.convert import convert_model
from mlx_surgical.convert.gguf import repack, unpermute_rows
from mlx_surgical.errors import UserError
from mlx_surgical.export.gguf import permute_rows
from mlx_surgical.model import load_model
from mlx_surgical.tiny import build_tiny_model

IDS = [1, 366, 480, 492, 511, 475, 469, 402, 268, 305, 366, 486, 480, 436, 290, 274]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def mlx_logits(model_dir, dtype: str = "auto") -> np.ndarray:
    return np.array(load_model(str(model_dir), dtype=dtype).model(mx.array([IDS])))


def transformers_gguf_logits(path: Path) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits.numpy()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, gguf_dir):
    """The tiny model as GGUF files of several tensor types, made on first use."""
    made = {}

    def make(tensor_type: str) -> Path:
        if tensor_type not in made:
            made[tensor_type] = write_llama_gguf(tiny_model, gguf_dir / f"tiny-{tensor_type}.gguf", tensor_type)
        return made[tensor_type]

    return make


def test_the_test_gguf_files_are_the_tiny_model_for_transformers(tiny_model, tiny_gguf):
    """What tests/gguf_files.py writes is read by transformers' loader as the original model."""
    pytest.importorskip("torch")
    # Tolerance: float32 on both sides; measured max difference ~2e-6 on logits of size ~5.
    np.testing.assert_allclose(transformers_gguf_logits(tiny_gguf("F32")), mlx_logits(tiny_model), atol=1e-4)


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q5_0"])
def test_converted_gguf_has_the_logits_of_transformers_gguf_loader(tiny_gguf, tmp_path, tensor_type):
    pytest.importorskip("torch")
    path = tiny_gguf(tensor_type)
    out = convert_model(str(path), tmp_path / "mlx", bits=None, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == 2
    # Tolerance: both dequantize the same blocks to float32; measured max difference ~2e-6.
    np.testing.assert_allclose(mlx_logits(out), transformers_gguf_logits(path), atol=1e-4)


@pytest.mark.parametrize("tensor_type, bits", [("Q4_0", 4), ("Q4_1", 4), ("Q8_0", 8)])
def test_q4_and_q8_stay_quantized_bit_for_bit(tiny_gguf, tmp_path, tensor_type, bits):
    path = tiny_gguf(tensor_type)
    out = convert_model(str(path), tmp_path / "mlx", bits=4, dtype="float16")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": bits}
    loaded = load_model(str(out))
    assert loaded.shape.quant_bits == bits and loaded.shape.quant_group_size == 32
    ours = mx.load(str(out / "model.safetensors"))
    theirs = mx.load(str(path))  # MLX's own GGUF reader: the same blocks as MLX arrays, in llama.cpp's order
    for suffix in ("weight", "scales", "biases"):
        np.testing.assert_array_equal(np.array(ours[f"model.layers.1.mlp.up_proj.{suffix}"]),
                                      np.array(theirs[f"blk.1.ffn_up.{suffix}"]))
        np.testing.assert_array_equal(np.array(ours[f"model.layers.0.self_attn.q_proj.{suffix}"]),
                                      unpermute_rows(np.array(theirs[f"blk.0.attn_q.{suffix}"]), 4))
    float_out = convert_model(str(path), tmp_path / "float", bits=None, dtype="float32")
    # Tolerance: the same values, through MLX's quantized matmul (scales cast exactly to float32) or a
    # plain one; measured ~2e-6.
    np.testing.assert_allclose(mlx_logits(out, "float32"), mlx_logits(float_out), atol=1e-4)


def test_repack_and_unpermute_invert_what_llama_cpp_does():
    rows = np.arange(48 * 5).reshape(48, 5)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(rows, 3), 3), rows)
    values = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    for name in ("Q4_0", "Q4_1", "Q8_0"):
        qtype = gguf.GGMLQuantizationType[name]
        weight, scales, biases = repack(gguf.quants.quantize(values, qtype), name)
        mlx_values = mx.dequantize(mx.array(weight), mx.array(scales), mx.array(biases), group_size=32,
                                   bits=8 if name == "Q8_0" else 4)
        expected = gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype)
        # Tolerance: MLX dequantizes in float16, gguf in float32 (one float16 rounding of values ~2).
        np.testing.assert_allclose(np.array(mlx_values.astype(mx.float32)), expected, atol=2e-3)


def test_dequantized_types_take_bits_and_group_size(tiny_gguf, tmp_path):
    out = convert_model(str(tiny_gguf("F16")), tmp_path / "q4", bits=4, group_size=64, dtype="float16")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["gguf"]["tensors_kept_quantized"] == 0 and provenance["gguf"]["quantization"] == "F16"
    with pytest.raises(UserError, match="--group-size: 128 does not divide the 64 inputs"):
        convert_model(str(tiny_gguf("F16")), tmp_path / "q128", bits=4, group_size=128)


def test_provenance_names_the_gguf_file_its_hash_and_quantization(tiny_gguf, tmp_path):
    path = tiny_gguf("Q4_0")
    out = convert_model(str(path), tmp_path / "mlx")
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source"] == str(path)
    assert provenance["gguf"]["file"] == str(path.resolve())
    assert provenance["gguf"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert provenance["gguf"]["quantization"] == "Q4_0"
    assert provenance["gguf"]["tensor_types"] == {"Q4_0": 16, "F32": 5}
    assert provenance["gguf"]["tensors_kept_quantized"] == 16


def test_tokenizer_chat_template_and_special_tokens_come_from_the_gguf(tiny_model, gguf_dir, tmp_path):
    path = write_llama_gguf(tiny_model, gguf_dir / "chat.gguf", "F32", extra_metadata={
        "tokenizer.chat_template": (CHATML, gguf.GGUFValueType.STRING)})
    out = convert_model(str(path), tmp_path / "mlx", bits=None, dtype="float32")
    tokenizer = load_model(str(out)).tokenizer
    original = load_model(str(tiny_model)).tokenizer
    text = "def add(a, b):\n    return a + b  # 42"
    assert tokenizer.encode(text) == original.encode(text)
    assert tokenizer.decode(original.encode(text), skip_special_tokens=True) == text
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_non_llama_files_and_unsupported_tensors_are_refused_in_one_line(tiny_model, tiny_gguf, gguf_dir, tmp_path):
    cases = {
        "qwen2.gguf": ({"arch": "qwen2"}, "architecture 'qwen2' is not supported"),
        "freqs.gguf": ({"extra_tensors": {"rope_freqs.weight": np.ones(8, np.float32)}},
                       "per-frequency RoPE factors"),
        "bias.gguf": ({"extra_tensors": {"blk.0.attn_q.bias": np.ones(64, np.float32)}},
                      "tensor blk.0.attn_q.bias has no place in a Llama model"),
        "i8.gguf": ({"extra_tensors": {"blk.2.attn_q.weight": np.ones((64, 64), np.int8)}},
                    "blk.2.attn_q.weight is of type I8, which the gguf package cannot dequantize"),
    }
    for name, (kwargs, message) in cases.items():
        path = write_llama_gguf(tiny_model, gguf_dir / name, "F32", **kwargs)
        result = CliRunner().invoke(cli, ["convert", str(path), "--out", str(tmp_path / name)])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and message in errors[0], result.output
        assert not (tmp_path / name).exists()
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        convert_model(str(not_gguf), tmp_path / "x")
    with pytest.raises(UserError, match="--revision: applies to Hugging Face repo ids"):
        convert_model(str(tiny_gguf("F32")), tmp_path / "y", revision="main")


def ollama_store(root: Path, blob_source: Path, name: str = "library/tiny", tag: str = "latest") -> str:
    """An Ollama model store as `ollama pull` leaves it: a manifest and content-addressed blobs."""
    digest = hashlib.sha256(blob_source.read_bytes()).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copy(blob_source, root / "blobs" / f"sha256-{digest}")
    template = b"{{ .Prompt }}"
    template_digest = hashlib.sha256(template).hexdigest()
    (root / "blobs" / f"sha256-{template_digest}").write_bytes(template)
    manifest = root / "manifests" / "registry.ollama.ai" / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                    "size": blob_source.stat().st_size},
                   {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{template_digest}",
                    "size": len(template)}],
    }))
    return digest


def test_convert_an_ollama_model_by_name(tiny_gguf, tmp_path, monkeypatch):
    store = tmp_path / "ollama"
    digest = ollama_store(store, tiny_gguf("Q8_0"))
    ollama_store(store, tiny_gguf("F32"), name="me/coder", tag="7b")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["convert", "ollama:tiny"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "models" / "tiny-4bit"
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source"] == "ollama:tiny" and provenance["gguf"]["sha256"] == digest
    assert provenance["gguf"]["ollama_digest"] == f"sha256:{digest}"
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    coder = convert_model("ollama:me/coder:7b", bits=None, dtype="float32")
    assert coder == Path("models/coder-7b-float32") and json.loads((coder / "provenance.json").read_text())[
        "gguf"]["quantization"] == "ALL_F32"
    with pytest.raises(UserError, match=r"ollama:tiny:13b: no manifest at .*pull it with `ollama pull tiny:13b`"):
        convert_model("ollama:tiny:13b")
    with pytest.raises(UserError, match="not a model name"):
        convert_model("ollama:../../etc")


def transformers5_config(tiny_dir: Path, **rope) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    config.pop("rope_theta")
    config.update(rope)
    (tiny_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def theta_model(tmp_path_factory):
    """A tiny model whose config.json states RoPE only as transformers 5 writes it."""
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "theta")
    transformers5_config(path, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"})
    return path


def test_rope_theta_in_transformers_5_form_is_read_as_transformers_reads_it(theta_model, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    loaded = load_model(str(theta_model))
    assert loaded.model.model.layers[0].self_attn.rope.base == 100000.0
    with torch.no_grad():
        reference = LlamaForCausalLM.from_pretrained(str(theta_model), dtype=torch.float32)(
            torch.tensor([IDS])).logits.numpy()
    # Tolerance: float32 both sides; measured ~3e-6. With theta 10,000 the difference is ~0.5.
    np.testing.assert_allclose(mlx_logits(theta_model), reference, atol=1e-4)

    converted = convert_model(str(theta_model), tmp_path / "hf", bits=None, dtype="float32")
    assert json.loads((converted / "config.json").read_text())["rope_theta"] == 100000.0
    from mlx_lm.utils import load

    model, _ = load(str(converted))  # plain mlx-lm, no help from us
    np.testing.assert_allclose(np.array(model(mx.array([IDS]))), reference, atol=1e-4)

    from_gguf = convert_model(str(write_llama_gguf(theta_model, tmp_path / "theta.gguf")), tmp_path / "gguf",
                              bits=None, dtype="float32")
    assert json.loads((from_gguf / "config.json").read_text())["rope_theta"] == 100000.0
    np.testing.assert_allclose(mlx_logits(from_gguf), reference, atol=1e-4)


def test_fused_export_states_rope_theta(theta_model, tmp_path):
    from conftest import short_config

    from mlx_surgical.export import export_adapter
    from mlx_surgical.pipeline import train_run

    run = train_run(short_config(theta_model, tmp_path, iters=1), progress=False, log=lambda _: None)
    fused = export_adapter(run.run_dir, "fused", tmp_path / "fused")
    assert json.loads((fused / "config.json").read_text())["rope_theta"] == 100000.0


def test_a_config_whose_rope_forms_disagree_is_refused(tmp_path):
    path = build_tiny_model(tmp_path / "conflict")
    transformers5_config(path, rope_theta=10000.0, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    with pytest.raises(UserError, match="rope_theta 10000.0 disagrees with rope_parameters.rope_theta 1e"):
        load_model(str(path))
    with pytest.raises(UserError, match="disagrees"):
        convert_model(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_written_by_llama_cpps_converter_converts_back_to_the_same_model(tiny_model, tmp_path):
    """The real producer: llama.cpp's convert_hf_to_gguf.py (LLAMA_CPP_DIR, see test_export.py)."""
    import subprocess
    import sys

    from test_export import llama_cpp_checkout

    source = llama_cpp_checkout()
    for outtype in ("f32", "q8_0"):
        path = tmp_path / f"tiny-{outtype}.gguf"
        subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(tiny_model), "--outfile", str(path),
                        "--outtype", outtype], check=True, capture_output=True)
        out = convert_model(str(path), tmp_path / outtype, bits=None if outtype == "f32" else 8, dtype="float32")
        text = "def add(a, b):\n    return a + b"
        assert load_model(str(out)).tokenizer.encode(text) == load_model(str(tiny_model)).tokenizer.encode(text)
        # Tolerance: f32 converts back exactly (measured 0.0); q8_0 carries llama.cpp's 8-bit rounding
        # (measured max 0.057 on logits of size ~5).
        np.testing.assert_allclose(mlx_logits(out), mlx_logits(tiny_model), atol=1e-5 if outtype == "f32" else 0.1)


@pytest.mark.parametrize("ftype, kept", [("Q4_K_M", False), ("Q4_0", True)])
def test_files_quantized_by_llama_cpp_convert_like_transformers_reads_them(tmp_path, ftype, kept):
    """llama.cpp's own quantizer (llama-cpp-python): Q4_K_M, the K-quant mix Ollama and LM Studio
    ship (Q4_K and Q6_K, dequantized here), and Q4_0 (kept; llama.cpp gives its output layer Q6_K)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    from mlx_surgical.tiny import TinyShape

    # K-quant blocks hold 256 weights: every input dimension must be a multiple of 256.
    model = build_tiny_model(tmp_path / "wide", TinyShape(hidden_size=256, intermediate_size=512))
    source = write_llama_gguf(model, tmp_path / "wide-f32.gguf")
    path = tmp_path / f"wide-{ftype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(path).encode(), params) == 0
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert ("Q4_K" in types and "Q6_K" in types) if ftype == "Q4_K_M" else ("Q4_0" in types and "Q6_K" in types)

    out = convert_model(str(path), tmp_path / "mlx", bits=4, dtype="float32")
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["gguf"]["quantization"] == ftype and (provenance["gguf"]["tensors_kept_quantized"] > 0) == kept
    reference = transformers_gguf_logits(path)
    float_out = convert_model(str(path), tmp_path / "float", bits=None, dtype="float32")
    # Tolerance: the same dequantized values in float32; measured max difference ~2e-6.
    np.testing.assert_allclose(mlx_logits(float_out), reference, atol=1e-4)
    # Tensors that are not Q4_0/Q4_1/Q8_0 are re-quantized by MLX to 4 bits and add their own rounding,
    # as a 4-bit conversion of the random tiny model does (test_convert_plan.py). Measured relative RMS
    # error: 0.21 for Q4_K_M (everything re-quantized), 0.09 for Q4_0 (only the Q6_K output layer).
    error = relative_rms_error(mlx_logits(out, "float32"), reference)
    assert error < (0.35 if not kept else 0.2), error


def relative_rms_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def test_without_pytorch_a_gguf_is_refused_naming_the_extra_before_anything_is_written(tiny_gguf, tmp_path):
    # transformers' GGUF tokenizer reader imports torch; a module set to None cannot be imported.
    hide_torch = ("import sys; sys.modules['torch'] = None; from mlx_surgical.cli import cli; "
                  "cli(sys.argv[1:], prog_name='mlx-surgical')")
    for argv in (["convert", str(tiny_gguf("F32")), "--out", str(tmp_path / "out")],
                 ["quickstart", "--real", "--model-dir", str(tmp_path / "smollm2"), "--out", str(tmp_path / "runs")]):
        result = subprocess.run([sys.executable, "-c", hide_torch, *argv], capture_output=True, text=True,
                                env={**os.environ, "MLX_SURGICAL_CACHE": str(tmp_path / "cache")})
        assert result.returncode == 2, result.stderr
        assert "converting a GGUF needs PyTorch" in result.stderr and 'pip install -e ".[gguf]"' in result.stderr
        assert "Traceback" not in result.stderr and not list(tmp_path.glob("*/*"))
