"""README's first two commands are what a newcomer runs and what CI runs: keep them true."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_install_and_quickstart_then_tests():
    quickstart, tests = command_blocks()[:2]
    assert quickstart.strip() == "pip install -e . && mlx-surgical quickstart"
    assert "pytest" in tests and '".[dev,server]"' in tests


def test_ci_runs_exactly_the_readme_test_command():
    test_command = command_blocks()[1].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def readme() -> str:
    """The README with line breaks as spaces, so a phrase is found wherever it wraps."""
    return " ".join((ROOT / "README.md").read_text().split())


def test_first_screen_says_what_a_linux_user_needs():
    from mlx_surgical.backend import NO_OPENBLAS_SLOWDOWN

    text = (ROOT / "README.md").read_text()
    first_screen = " ".join(text[:text.index("\n## ")].split("\n")[:30])
    assert "apt-get install libopenblas0-pthread" in first_screen and "dnf install openblas" in first_screen
    assert f"about {NO_OPENBLAS_SLOWDOWN}x slower" in first_screen


def test_schedule_and_parameter_figures_are_the_codes():
    from mlx_surgical.config import load_config, preset_path
    from mlx_surgical.data import read_records, sample_path
    from mlx_surgical.plan import KNOWN_SHAPES, lora_parameter_count
    from mlx_surgical.train import schedule_for

    surgical = load_config(preset_path("surgical"))
    t = surgical.training
    examples = len(read_records(sample_path("train")))
    updates = schedule_for(examples, t).updates
    text = readme()
    assert f"{updates} updates for the bundled {examples} training examples x {t.epochs} epochs" in text
    assert f"({examples} examples x {t.epochs} epochs at batch {t.batch_size} x {t.grad_accumulation_steps} = " \
           f"{updates} updates)" in text
    params = lora_parameter_count(KNOWN_SHAPES["codellama-7b"], surgical.lora)
    assert f"{params:,} for the surgical preset on CodeLlama-7B, {4 * params / 1e6:.1f} MB in float32 and " \
           f"{2 * params / 1e6:.1f} MB in float16" in text


def test_preset_descriptions_are_the_presets():
    from mlx_surgical.config import load_config, preset_path

    def sci(x: float) -> str:
        return f"{x:.0e}".replace("e-0", "e-")

    s, n = load_config(preset_path("surgical")), load_config(preset_path("nuclear"))
    t = s.training
    text = readme()
    assert s.lora.target_modules == ["q_proj", "k_proj", "v_proj"] and s.lora.layers == "all"
    assert (f"rank {s.lora.rank} / alpha {s.lora.alpha:g} / dropout {s.lora.dropout:g} on q/k/v of every layer, "
            f"{t.epochs} epochs, learning rate {sci(t.learning_rate)}, batch {t.batch_size} x "
            f"{t.grad_accumulation_steps} accumulation, {t.warmup_steps} warmup updates then {t.schedule}, "
            f"weight decay {t.weight_decay:g}") in text
    assert len(n.lora.target_modules) == 7
    assert f"rank {n.lora.rank} / alpha {n.lora.alpha:g} on all seven projections, {n.training.epochs} epochs" in text


def test_the_config_table_names_every_setting():
    import dataclasses

    from mlx_surgical.config import SECTIONS

    rows = {line.split("|")[1].strip(" `"): line for line in (ROOT / "README.md").read_text().splitlines()
            if line.startswith("| `") and line.split("|")[1].strip(" `") in SECTIONS}
    assert rows.keys() == SECTIONS.keys()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in rows[section], f"{section}.{f.name}"


def test_the_slowdown_factors_are_the_ones_the_warnings_use():
    from mlx_surgical.backend import HALF_PRECISION_SLOWDOWN, NO_OPENBLAS_SLOWDOWN, QUANTIZED_SLOWDOWN

    text = readme()
    assert f"training about {NO_OPENBLAS_SLOWDOWN}x faster" in text
    assert f"float16 trains about {HALF_PRECISION_SLOWDOWN}x slower" in text
    assert f"trained about {QUANTIZED_SLOWDOWN:g}x slower than float32 weights" in text
