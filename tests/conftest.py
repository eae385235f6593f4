"""Shared fixtures: a tiny model built once per session, and configs that train it briefly.

The suite runs offline (HF_HUB_OFFLINE) and, on Linux, re-executes itself once with
OpenBLAS preloaded exactly as the CLI does (see mlx_surgical/backend.py)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from mlx_surgical.backend import fast_blas_environment, reexec  # noqa: E402

from mlx_surgical.config import config_from_dict  # noqa: E402
from mlx_surgical.data import sample_path  # noqa: E402
from mlx_surgical.tiny import build_tiny_model  # noqa: E402


def pytest_configure(config):
    """Re-run the session with OpenBLAS preloaded before any test imports mlx. pytest has
    already redirected stdout to its capture files; restore them first."""
    env = fast_blas_environment()
    if env is not None:
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.stop_global_capturing()
        reexec(env)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def short_config(model_dir, out_dir, **training):
    """A config that trains the tiny model for a few updates on the bundled data."""
    return config_from_dict({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "lora": {"dropout": 0.0},
        "data": {"train": str(sample_path("train")), "valid": str(sample_path("valid"))},
        "training": {"iters": 6, "learning_rate": 1e-2, "warmup_steps": 2, "grad_accumulation_steps": 2,
                     "max_seq_length": 512, "save_every": 3, "eval_every": 3, **training},
        "output": {"dir": str(out_dir), "name": "run"},
    })


@pytest.fixture
def make_config(tiny_model, tmp_path):
    return lambda **training: short_config(tiny_model, tmp_path / "adapters", **training)


@pytest.fixture(scope="session")
def trained_run(tiny_model, tmp_path_factory):
    """A finished run on the tiny model whose LoRA B matrices are far from zero."""
    from mlx_surgical.pipeline import train_run

    config = short_config(tiny_model, tmp_path_factory.mktemp("adapters"), iters=8, learning_rate=2e-2)
    return train_run(config, progress=False, log=lambda _: None).run_dir


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory):
    """A base model of another shape, for refusal tests."""
    from mlx_surgical.tiny import TinyShape

    return build_tiny_model(tmp_path_factory.mktemp("models") / "other", TinyShape(layers=3, hidden_size=128))
