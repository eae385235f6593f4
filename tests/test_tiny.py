"""The tiny model factory: loadable by mlx-lm and by transformers, deterministic, real tokenizer."""

import errno

import numpy as np
import pytest

from mlx_surgical.errors import UserError
from mlx_surgical.tiny import TinyShape, build_tiny_model

CODE = "def add(a, b):\n    return a + b  # sum"


def test_same_seed_same_bytes_other_seed_other_weights(tiny_model, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    files = sorted(p.name for p in tiny_model.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    for name in files:
        assert (tiny_model / name).read_bytes() == (again / name).read_bytes(), name
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_model / "model.safetensors").read_bytes()
    assert (other / "tokenizer.model").read_bytes() == (tiny_model / "tokenizer.model").read_bytes()


def test_mlx_lm_and_transformers_load_it_and_agree(tiny_model):
    import mlx.core as mx
    import torch
    from mlx_lm.utils import load
    from transformers import AutoTokenizer, LlamaForCausalLM

    model, tokenizer = load(str(tiny_model))
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    ids = hf_tokenizer.encode(CODE)
    assert ids == tokenizer.encode(CODE)
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == CODE
    assert ids[0] == 1 and tokenizer.eos_token_id == 2

    hf_model = LlamaForCausalLM.from_pretrained(str(tiny_model), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf_model(torch.tensor([ids])).logits.numpy()
    mlx_logits = np.array(model(mx.array([ids])))
    np.testing.assert_allclose(mlx_logits, hf_logits, atol=1e-4)


def test_the_tokenizer_is_a_real_sentencepiece_model(tiny_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_model / "tokenizer.model"))
    assert sp.get_piece_size() == 512
    assert sp.decode(sp.encode(CODE)) == CODE
    assert len(sp.encode(CODE)) <= len(CODE) / 2  # learned merges, not bytes


def test_refuses_bad_shapes_and_non_empty_directories(tiny_model, tmp_path):
    with pytest.raises(UserError, match="not divisible"):
        build_tiny_model(tmp_path / "x", TinyShape(hidden_size=60, heads=8))
    with pytest.raises(UserError, match="not empty"):
        build_tiny_model(tiny_model)


def test_a_build_that_fails_part_way_leaves_nothing_behind(tmp_path, monkeypatch):
    """The disk fills while the tokenizer is written: no half model that a second try refuses."""
    import mlx_surgical.tiny as tiny

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tiny, "train_sentencepiece", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        build_tiny_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert (build_tiny_model(tmp_path / "model") / "tokenizer.json").exists()


def test_a_vocab_larger_than_the_tokenizer_and_tied_embeddings(tmp_path):
    """CodeLlama's shape: 32016 embedding rows for 32000 pieces; the benchmark's "small" model ties them."""
    import mlx.core as mx
    import sentencepiece as spm
    import torch
    from mlx_lm.utils import load
    from transformers import LlamaForCausalLM

    path = build_tiny_model(tmp_path / "wide", TinyShape(layers=1, vocab_size=3000, tie_embeddings=True))
    assert spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")).get_piece_size() == 2048
    model, tokenizer = load(str(path))
    ids = tokenizer.encode(CODE)
    logits = np.array(model(mx.array([ids])))
    assert logits.shape[-1] == 3000
    hf = LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor([ids])).logits.numpy(), logits, atol=1e-4)
