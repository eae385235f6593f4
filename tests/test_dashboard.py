"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright (never
`playwright install`: the system browser is used), against `mlx-surgical serve` on loopback
with a token, training the tiny model for real. A screenshot of each step is written to
tests/artifacts/dashboard/."""

import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Optional

import pytest
from conftest import short_config

from mlx_surgical.jobs import JobStore

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).parent / "artifacts" / "dashboard"
TOKEN = "t0ken-for-the-browser"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[dev]'")
pytest.importorskip("fastapi", reason="the server extra is missing: pip install -e '.[server]'")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: apt-get install chromium")


def start_playwright():
    """Playwright's driver (node) and Chromium fail to start threads with the OpenBLAS that the
    test session preloads for MLX; they start without it, the servers keep it."""
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        return sync_api.sync_playwright().start()
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload


@pytest.fixture
def page():
    playwright = start_playwright()
    try:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        errors, requested = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda request: requested.append(request.url))
        page.set_default_timeout(30_000)
        yield page
        browser.close()
    finally:
        playwright.stop()
    assert not errors, f"JavaScript errors in the page: {errors}"
    # README: the page loads nothing from elsewhere and calls only the public API.
    elsewhere = [url for url in requested if not re.fullmatch(r"http://127\.0\.0\.1:\d+/(static/.*|api/.*|\?.*|#.*)?",
                                                                url) and not url.startswith(("blob:", "data:"))]
    assert requested and not elsewhere, elsewhere


@pytest.fixture
def workspace(tmp_path, tiny_model):
    """A workspace whose models/tiny-llama is where the tiny preset looks for its model."""
    workspace = tmp_path / "workspace"
    shutil.copytree(tiny_model, workspace / "models" / "tiny-llama")
    return workspace


def shot(page, name: str, height: Optional[int] = None) -> None:
    """The whole page, or its top `height` pixels."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    clip = {"x": 0, "y": 0, "width": page.viewport_size["width"], "height": height} if height else None
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True, clip=clip)


def chart_points(page) -> int:
    return int(page.get_attribute("#loss-chart", "data-points") or 0)


def wait_for_points(page, at_least: int, timeout: float = 60) -> int:
    """Polled from here: the page's Content-Security-Policy forbids the eval behind wait_for_function."""
    deadline = time.time() + timeout
    while (points := chart_points(page)) < at_least:
        assert time.time() < deadline, f"the chart has {points} points, not {at_least}"
        page.wait_for_timeout(100)
    return points


def test_a_run_started_from_the_form_is_watched_stopped_resumed_compared_and_downloaded(
        start_server, page, workspace, tiny_model, tmp_path):
    server = start_server("--token", TOKEN, workspace=workspace)
    printed_url = server.banner[0].split(" at ")[1]
    page.goto(printed_url)
    page.wait_for_selector("text=No runs yet")
    assert "token" not in page.url  # moved out of the address bar ...
    assert page.evaluate("sessionStorage.getItem('mlx-surgical-token')") == TOKEN  # ... into session storage
    shot(page, "01-runs-empty")

    page.click("nav >> text=New run")
    page.wait_for_selector("#start")
    assert page.input_value("#preset") == "tiny" and page.input_value("#field-model-path") == "models/tiny-llama"
    page.fill("#field-output-name", "browser")
    page.fill("#field-training-length", "60")
    page.select_option("#field-training-unit", "iters")
    page.fill("#field-training-save_every", "5")
    page.fill("#field-training-eval_every", "20")
    page.click("#validate")
    page.wait_for_selector("#notes .ok")
    assert "schedule: 60 optimizer updates" in page.inner_text("#notes")
    shot(page, "02-new-run-validated")

    page.click("#start")
    page.wait_for_url("**/#/run/browser")
    with server.client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:  # queued behind it, to compare
        second = client.post("/api/training/start", json={
            "model": {"path": "models/tiny-llama", "dtype": "float32"}, "data": {"train": "bundled:train"},
            "training": {"iters": 3, "learning_rate": 5e-3, "max_seq_length": 512}, "output": {"name": "second"}})
        assert second.status_code == 202, second.text

    seen = wait_for_points(page, 3)
    wait_for_points(page, seen + 5)
    assert page.locator("#loss-chart canvas").count() == 1 and page.locator("#lr-chart canvas").count() == 1
    shot(page, "03-training")

    page.click("#stop")
    page.wait_for_selector('.status[data-state="cancelled"]')
    stopped_at = chart_points(page)
    assert seen + 5 <= stopped_at < 60
    shot(page, "04-stopped")

    # The queue moves on to "second". Waiting for that keeps this test clear of a known scheduler
    # race (issue 17: a resume within moments of a stop reads the old worker's exit as a crash).
    with server.client(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        deadline = time.time() + 60
        while {j["run_name"]: j["state"] for j in client.get("/api/training/jobs").json()}["second"] == "queued":
            assert time.time() < deadline
            time.sleep(0.1)
    page.click("#resume")
    page.wait_for_selector('.status[data-state="succeeded"]', timeout=120_000)
    assert chart_points(page) == 60
    assert "ended: succeeded" in page.inner_text("#event-log")
    page.wait_for_selector("#plan")
    assert "60 (10 warmup)" in page.inner_text("#plan")

    page.click("text=Compare with other runs")
    page.check("input[value=second]")
    page.wait_for_selector(".u-legend >> text=second training loss")
    shot(page, "05-succeeded-compared")
    shot(page, "05-succeeded-compared-top", height=1000)  # the README's picture (docs/dashboard.png)

    with page.expect_download() as download_info:
        page.click("#download-mlx")
    archive = tmp_path / "download.zip"
    download_info.value.save_as(archive)
    assert download_info.value.suggested_filename == "browser-mlx.zip"
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp_path / "unzipped")
    assert_loads_as_the_trained_adapter(tiny_model, tmp_path / "unzipped" / "browser-mlx",
                                        workspace / "adapters" / "browser")

    page.click("nav >> text=Adapters")
    page.click('tr[data-adapter="browser"] >> text=Verify')
    page.wait_for_selector('tr[data-result="browser"] >> text=browser: ok')
    page.click('tr[data-adapter="second"] >> text=Delete…')
    shot(page, "06-adapters-verify-and-confirm-delete")
    page.click('tr[data-adapter="second"] >> .confirm-delete')
    page.wait_for_selector('tr[data-adapter="second"]', state="detached")
    assert not (workspace / "adapters" / "second").exists() and (workspace / "adapters" / "browser").exists()

    page.click("nav >> text=Runs")
    page.wait_for_selector('tr[data-run="browser"] >> text=succeeded')
    shot(page, "07-runs")


def assert_loads_as_the_trained_adapter(base: Path, exported: Path, run_dir: Path) -> None:
    """mlx-lm loads the unzipped export onto the base model, with exactly the trained weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.lora import LoRALinear

    model, _ = load(str(base), adapter_path=str(exported))
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    loaded = {k: v for k, v in tree_flatten(model.parameters()) if ".lora_" in k}
    trained = mx.load(str(run_dir / "adapters.safetensors"))
    assert loaded.keys() == trained.keys() and loaded
    assert all(mx.array_equal(loaded[k], trained[k]).item() for k in trained)


def test_a_missing_token_is_asked_for_and_bad_input_is_shown_beside_its_field(start_server, page, workspace,
                                                                                 tmp_path):
    server = start_server("--token", TOKEN, workspace=workspace)
    page.goto(server.url + "/#/new")
    page.wait_for_selector("#token-form:not([hidden])")
    page.fill("#token-input", "wrong")
    page.click("#token-form button")
    page.wait_for_selector("#token-problem >> text=that token was refused")
    page.fill("#token-input", TOKEN)
    page.click("#token-form button")
    page.wait_for_selector("#start")
    assert page.is_hidden("#token-form")

    bad = tmp_path / "my data.jsonl"
    bad.write_text('{"instruction": "Add one", "response": "x + 1"}\n{"instruction": "Add two", "response": }\n')
    page.check("input[name=train-source][value=upload]")
    page.set_input_files("#train-file", str(bad))
    page.click("#validate")
    problem = page.wait_for_selector('[data-field="data.train"] .field-problems li')
    assert problem.inner_text().startswith("my_data.jsonl:2: malformed JSON line")
    shot(page, "08-bad-upload")

    page.check("input[name=train-source][value=bundled]")
    page.fill("#field-training-learning_rate", "-1")
    page.fill("#field-lora-rank", "0")
    page.click("#validate")
    page.wait_for_selector('[data-field="training.learning_rate"] .field-problems li')
    assert page.inner_text('[data-field="training.learning_rate"] .field-problems') == \
        "config: training.learning_rate: must be positive"
    assert page.inner_text('[data-field="lora.rank"] .field-problems') == "config: lora.rank: must be at least 1"
    shot(page, "09-bad-fields")
    assert "Traceback" not in page.content()
    assert not (workspace / "jobs").exists() or not any(p.is_dir() for p in (workspace / "jobs").iterdir())


def test_the_runs_list_shows_every_job_the_server_keeps(start_server, page, workspace, tiny_model):
    """The server keeps up to serve.keep_jobs (500) finished jobs; the API hands them out a page at
    a time, and the runs list reads every page (it once showed the newest 100 only)."""
    store = JobStore(workspace)
    for i in range(101):  # over one page (the dashboard's and the API's default: 100)
        config = short_config(tiny_model, store.adapters)
        config.output.name = f"earlier-{i:04d}"
        with store.locked(store.create(config).id) as job:
            job.state, job.error = "failed", "stopped by the test"
    server = start_server("--token", TOKEN, workspace=workspace)
    page.goto(server.banner[0].split(" at ")[1])
    page.wait_for_selector('tr[data-run="earlier-0100"]')
    assert page.locator("#runs-table tbody tr").count() == 101
    assert page.is_visible('tr[data-run="earlier-0000"] >> text=failed')
