"""The real-model tier: SmolLM2-135M-Instruct, a pretrained Llama, from the Q4_1 GGUF that
llama.cpp and Ollama run. Converted, trained (configs/smollm2.json on the float32 conversion:
4-bit trains slowly on a CPU), exported, and each export read back by its real consumer.
Run `python scripts/fetch_smollm2.py` once first; without the model these tests skip."""

import gguf
import mlx.core as mx
import numpy as np
import pytest

from mlx_surgical.adapter import read_adapter
from mlx_surgical.convert import convert_model
from mlx_surgical.convert.gguf import unpermute_rows
from mlx_surgical.convert.smollm2 import GGUF_SHA256
from mlx_surgical.config import load_config, preset_path
from mlx_surgical.data import read_records, sample_path, to_messages
from mlx_surgical.export import export_adapter
from mlx_surgical.generate import answer, prompt_format_for
from mlx_surgical.surgery import load_with_adapter
from mlx_surgical.model import load_model
from mlx_surgical.provenance import read_provenance
from mlx_surgical.quickstart import held_out_loss

pytestmark = pytest.mark.real

TEXT = "def square(x):\n    return x * x\n\nprint(square(12))"


def relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


@pytest.fixture(scope="module")
def ids(smollm2_float32) -> list[int]:
    return load_model(str(smollm2_float32)).tokenizer.encode(TEXT)


def mlx_logits(model_dir, ids, adapter=None) -> np.ndarray:
    loaded = load_with_adapter(str(model_dir), adapter)
    loaded.model.set_dtype(mx.float32)
    return np.array(loaded.model(mx.array([ids])))[0]


@pytest.fixture(scope="module")
def transformers_model(smollm2_gguf, ids):
    """transformers' own GGUF loader (dequantizes, undoes llama.cpp's q/k order), with its logits
    taken before any adapter is attached to it."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        return model, model(torch.tensor([ids])).logits.numpy()[0]


def test_convert_the_gguf_quantized_and_float32(smollm2_gguf, smollm2_float32, transformers_model, ids, tmp_path):
    import json

    from mlx_lm.utils import load
    from transformers import AutoTokenizer

    quantized = convert_model(str(smollm2_gguf), tmp_path / "q4", dtype="float32")
    config = json.loads((quantized / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    assert config["quantization"] == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    provenance = read_provenance(quantized)
    assert provenance.source == str(smollm2_gguf) and provenance.hugging_face_model is None
    assert provenance.gguf["sha256"] == GGUF_SHA256 and provenance.gguf["quantization"] == "Q4_1"

    _, reference = transformers_model
    for model_dir in (quantized, smollm2_float32):
        model, tokenizer = load(str(model_dir))  # plain mlx-lm
        model.set_dtype(mx.float32)
        # Tolerance: the same dequantized values in float32 on both sides; measured max difference
        # 1.8e-4 on logits up to 37. Wrong q/k order or RoPE theta moves them by whole units.
        np.testing.assert_allclose(np.array(model(mx.array([ids])))[0], reference, atol=2e-3)
    theirs = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    assert tokenizer.encode(TEXT) == theirs.encode(TEXT) == ids
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_a_short_surgical_run_lowers_the_held_out_loss(smollm2_run, smollm2_float32):
    config = load_config(preset_path("smollm2"))
    config.model.path = str(smollm2_float32)
    before, after = held_out_loss(config), smollm2_run.final_val_loss  # measured: 1.527 -> 0.637
    assert smollm2_run.status == "succeeded" and smollm2_run.updates == 30
    assert after < 0.8 * before, (before, after)


def test_generation_takes_the_trained_answer_format(smollm2_run, smollm2_float32):
    held_out = read_records(sample_path("test"))[0]  # not in the training data
    prompt = to_messages(held_out)[0][-2]["content"]
    base = load_with_adapter(str(smollm2_float32))
    adapted = load_with_adapter(str(smollm2_float32), smollm2_run.run_dir)
    base_answer = answer(base, prompt_format_for(base), prompt, max_tokens=24)
    adapted_answer = answer(adapted, prompt_format_for(adapted, smollm2_run.run_dir), prompt, max_tokens=24)
    assert adapted_answer.startswith("Here is the function:\n\n```python\ndef unique_items("), adapted_answer
    assert not base_answer.startswith("Here is the function:"), base_answer


def test_peft_export_in_transformers_on_the_dequantized_gguf(smollm2_run, smollm2_float32, transformers_model, ids,
                                                             tmp_path):
    import torch
    from peft import PeftModel

    model, base_logits = transformers_model
    peft_dir = export_adapter(smollm2_run.run_dir, "peft", tmp_path / "peft")
    adapted = PeftModel.from_pretrained(model, str(peft_dir)).eval()
    with torch.no_grad():
        peft_logits = adapted(torch.tensor([ids])).logits.numpy()[0]
    mlx_adapted = mlx_logits(smollm2_float32, ids, smollm2_run.run_dir)
    assert np.abs(mlx_adapted - base_logits).max() > 1.0  # the adapter changes the output
    # Tolerance: float32 on both sides; measured max difference 6e-5 on logits up to 39, where the
    # adapter moves them by up to 5.4.
    np.testing.assert_allclose(peft_logits, mlx_adapted, atol=2e-3)


def test_gguf_adapter_layout_applies_to_the_original_file(smollm2_run, smollm2_gguf, smollm2_float32, tmp_path):
    """Names, shapes and metadata as llama.cpp reads them, and llama.cpp's arithmetic in numpy:
    the ORIGINAL file's dequantized weight plus alpha/r * B @ A is, back in Hugging Face row
    order, the fused weight MLX computes."""
    out = export_adapter(smollm2_run.run_dir, "gguf", tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(str(out))
    value = lambda key: reader.get_field(key).contents()
    assert (value("general.architecture"), value("general.type"), value("adapter.type")) == ("llama", "adapter", "lora")
    assert value("adapter.lora.alpha") == 16.0
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    rows = {"q": 576, "k": 192, "v": 192}
    assert set(tensors) == {f"blk.{i}.attn_{p}.weight.lora_{h}" for i in range(30) for p in rows for h in "ab"}
    for p, out_rows in rows.items():
        assert tensors[f"blk.7.attn_{p}.weight.lora_a"].shape == (8, 576)
        assert tensors[f"blk.7.attn_{p}.weight.lora_b"].shape == (out_rows, 8)

    original = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors}
    adapter = read_adapter(smollm2_run.run_dir)
    base = mx.load(str(smollm2_float32 / "model.safetensors"))
    for p, heads in (("q", 9), ("k", 3), ("v", None)):
        name = f"blk.7.attn_{p}.weight"
        tensor = original[name]
        weight = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        applied = weight + 16.0 / 8 * tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"]
        pair = next(x for x in adapter.pairs if x.layer == 7 and x.projection == f"{p}_proj")
        fused = np.array(base[f"model.layers.7.self_attn.{p}_proj.weight"]) + pair.delta(adapter.config.scale)
        np.testing.assert_allclose(unpermute_rows(applied, heads) if heads else applied, fused, atol=1e-5)


def test_llama_cpp_applies_the_adapter_to_the_original_gguf(smollm2_run, smollm2_gguf, smollm2_float32, ids,
                                                            tmp_path):
    """llama.cpp itself (llama-cpp-python): the ORIGINAL Q4_1 file with our GGUF adapter against
    MLX base + adapter. llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations, so
    its logits differ from exact ones by ~2% even without an adapter; that is the tolerance
    allowed with one. llama.cpp's own F32 copy of the same file pins the layout down tightly."""
    llama_cpp = pytest.importorskip("llama_cpp")
    adapter = export_adapter(smollm2_run.run_dir, "gguf", tmp_path / "adapter.gguf")

    def llama_cpp_logits(model, **kwargs):
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=64, logits_all=True, verbose=False, **kwargs)
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])

    mlx_base = mlx_logits(smollm2_float32, ids)
    mlx_adapted = mlx_logits(smollm2_float32, ids, smollm2_run.run_dir)
    plain, adapted = llama_cpp_logits(smollm2_gguf), llama_cpp_logits(smollm2_gguf, lora_path=str(adapter))
    assert np.abs(adapted - plain).max() > 1.0  # llama.cpp applied it
    # Measured: base 0.018 relative RMS, base + adapter 0.018; an adapter without the q/k row
    # permutation gives 0.048.
    assert relative_rms(adapted, mlx_adapted) < 1.5 * relative_rms(plain, mlx_base)
    assert (adapted.argmax(-1) == mlx_adapted.argmax(-1)).mean() >= 0.9

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_ALL_F32, True, 2
    float32 = tmp_path / "smollm2-f32.gguf"
    assert llama_cpp.llama_model_quantize(str(smollm2_gguf).encode(), str(float32).encode(), params) == 0
    # Tolerance: float32 kernels on both sides; measured max difference 0.016 (base) and 0.012
    # (with the adapter; 2.8 without the q/k permutation) on logits up to 39, where the adapter
    # moves them by up to 5.4.
    np.testing.assert_allclose(llama_cpp_logits(float32), mlx_base, atol=0.05)
    np.testing.assert_allclose(llama_cpp_logits(float32, lora_path=str(adapter)), mlx_adapted, atol=0.05)
