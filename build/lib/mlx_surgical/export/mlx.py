"""mlx-lm format: adapters.safetensors + adapter_config.json, without checkpoints, metrics or
the best/ folder, for `mlx_lm.generate --adapter-path` and `mlx_lm.server`."""

import shutil
from pathlib import Path

from ..adapter import Adapter
from ..files import staged_directory
from ..rundir import ADAPTER_CONFIG, ADAPTER_FILE


def write(adapter: Adapter, out: Path) -> Path:
    with staged_directory(out) as staging:
        for name in (ADAPTER_FILE, ADAPTER_CONFIG):
            shutil.copy2(adapter.directory / name, staging / name)
    return out
