"""Shared fixtures: a tiny model built once per session, configs that train it briefly,
`mlx-surgical serve` on a free loopback port, and for the tests marked `real` SmolLM2-135M-Instruct
(fetched into the cache, or a skip saying why), converted to float32 and trained once with the
preset `quickstart --real` uses.

The suite runs offline (HF_HUB_OFFLINE) and, on Linux, re-executes itself once with
OpenBLAS preloaded and compiles MLX's kernels exactly as the CLI does (see mlx_surgical/backend.py).
Under MLX_SURGICAL_TESTS_NO_SKIPS=1, as in CI, a skip fails the run (tests/no_skips.py, registered below)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from mlx_surgical.backend import (ensure_vector_kernels, fast_blas_environment, interleave_cpu_streams,  # noqa: E402
                                  reexec)

from mlx_surgical.config import config_from_dict  # noqa: E402
from mlx_surgical.data import sample_path  # noqa: E402
from mlx_surgical.tiny import build_tiny_model  # noqa: E402


def pytest_configure(config):
    """Prepare MLX's CPU backend as the CLI does: re-run the session with OpenBLAS preloaded
    before any test imports mlx (pytest has already redirected stdout to its capture files;
    restore them first), and vectorised kernels."""
    env = fast_blas_environment()
    if env is not None:
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.stop_global_capturing()
        reexec(env)
    ensure_vector_kernels()
    interleave_cpu_streams()
    config.pluginmanager.import_plugin("no_skips")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlx-surgical serve` in a subprocess; `banner` holds the lines it printed at start-up."""

    def __init__(self, workspace: Path, *args, cwd=None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "mlx_surgical", "serve", "--port", str(self.port),
                                         "--workspace", str(workspace), *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/api/health", timeout=1).status_code == 200:
                    self.banner = [self.process.stdout.readline().strip() for _ in range(3)]
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError(f"server did not start: {self.process.stdout.read()}")

    def client(self, **kwargs):
        import httpx

        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def close(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)


@pytest.fixture
def start_server(tmp_path):
    servers = []

    def start(*args, workspace=None, cwd=None):
        servers.append(Server(workspace or tmp_path / "workspace", *args, cwd=cwd))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# A directory name a user may well have, with everything a shell treats specially.
AWKWARD_NAME = """it's "my" $HOME `runs` \\ & more"""


@pytest.fixture
def pasted(tmp_path):
    """Run a command line as a user who pastes it into bash would, with our programs replaced by
    a stub that prints what it received: returns [program, *arguments]."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for program in ("mlx-surgical", "mlx_lm.generate"):
        stub = stubs / program
        stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        "print(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]))\n")
        stub.chmod(0o755)

    def run(line: str) -> list[str]:
        result = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30,
                                env={"PATH": f"{stubs}:/usr/bin:/bin", "HOME": "/nonexistent"})
        assert result.returncode == 0 and result.stdout.strip(), (line, result.stderr)
        return json.loads(result.stdout)

    return run


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct's Q4_1 GGUF in the cache (python scripts/fetch_smollm2.py puts it there);
    the tests marked `real` skip, saying why, when it cannot be had."""
    from mlx_surgical.convert.smollm2 import fetch_smollm2
    from mlx_surgical.errors import UserError

    try:
        return fetch_smollm2(log=lambda _: None)
    except UserError as e:
        pytest.skip(f"real-model tests need SmolLM2-135M-Instruct: {e}")


@pytest.fixture(scope="session")
def smollm2_float32(smollm2_gguf, tmp_path_factory):
    from mlx_surgical.convert import convert_model

    return convert_model(str(smollm2_gguf), tmp_path_factory.mktemp("models") / "smollm2-float32", bits=None,
                         dtype="float32", progress=False)


@pytest.fixture(scope="session")
def smollm2_run(smollm2_float32, tmp_path_factory):
    """configs/smollm2.json (rank 8 on q/k/v, 30 updates on the bundled pairs) on the float32 conversion."""
    from mlx_surgical.config import load_config, preset_path
    from mlx_surgical.pipeline import train_run

    config = load_config(preset_path("smollm2"))
    config.model.path = str(smollm2_float32)
    config.output.dir, config.output.name = str(tmp_path_factory.mktemp("adapters")), "smollm2"
    return train_run(config, progress=False, log=lambda _: None)
