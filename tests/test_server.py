"""The REST server for real: uvicorn on a free loopback port, a real HTTP client, real jobs."""

import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port
from safetensors.numpy import load_file

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [{"instruction": f"Write function number {i}", "response": f"def f{i}(x):\n    return x + {i}"}
            for i in range(6)]


def job_config(tiny_model, name: str, iters: int = 4, **training) -> dict:
    return {"model": {"path": str(tiny_model)}, "lora": {"dropout": 0.0},
            "data": {"examples": EXAMPLES, "valid_examples": EXAMPLES[:2]},
            "training": {"iters": iters, "learning_rate": 1e-2, "warmup_steps": 1, "grad_accumulation_steps": 1,
                         "save_every": 2, "eval_every": 2, **training},
            "output": {"name": name}}


def wait_for(client, job_id: str, condition, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/training/jobs/{job_id}").json()
        if condition(job):
            return job
        time.sleep(0.1)
    pytest.fail(f"job {job_id} never reached the expected state: {job}")


def test_a_job_posted_as_a_file_is_followed_to_success_and_downloaded(start_server, tiny_model, tmp_path):
    server = start_server()
    config_file = tmp_path / "surgical_training_config_full.json"
    config_file.write_text(json.dumps(job_config(tiny_model, "first", iters=4)))
    with server.client() as client:
        health = client.get("/api/health").json()
        assert health["status"] == "idle" and health["backend"] and health["version"]
        assert "/api/training/start" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200
        started = client.post("/api/training/start", content=config_file.read_bytes(),
                              headers={"Content-Type": "application/json"})
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]

        events, final = [], None
        with client.stream("GET", f"/api/training/jobs/{job_id}/events") as stream:
            kind = "message"
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: "):
                    payload = json.loads(line[len("data: "):])
                    if kind == "state":
                        final = payload
                    else:
                        events.append(payload)
        assert final["state"] == "succeeded", final
        assert [e["update"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4]
        assert any(e["type"] == "validation" for e in events) and events[-1] == {"type": "end", "state": "succeeded",
                                                                                 "error": None}
        assert final["update"] == final["total_updates"] == 4 and final["loss"] is not None

        metrics = client.get(f"/api/training/jobs/{job_id}/metrics").json()
        assert [m["update"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
        assert [a["name"] for a in client.get("/api/adapters").json()] == ["first"]
        assert client.get("/api/adapters/first").json()["adapter_config"]["lora_parameters"]["rank"] == 8
        for fmt, expected in (("mlx", "adapters.safetensors"), ("peft", "adapter_model.safetensors"),
                              ("gguf", "first-gguf.gguf")):
            download = client.get("/api/adapters/first/export", params={"format": fmt})
            assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
            names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
            assert any(n.endswith(expected) for n in names), names
            if fmt == "gguf":  # the file llama.cpp and Ollama take, named as the CLI names it
                assert names == ["first-gguf.gguf"], names

        # What the dashboard reads about a run: its metrics, resolved config and plan.
        assert client.get("/api/adapters/first/metrics").json() == metrics
        resolved = client.get("/api/adapters/first/config").json()
        assert resolved["training"]["iters"] == 4 and resolved["output"]["dir"].endswith("adapters")
        plan = client.get("/api/adapters/first/plan").json()
        assert plan["schedule"]["updates"] == 4
        assert plan["trainable_parameters"] == client.get("/api/adapters/first").json()["trainable_parameters"]
        checked = client.post("/api/adapters/first/verify").json()["checked"]
        assert any("checksum ok" in line for line in checked) and "shapes fit" in checked[-1]

        deleted = client.delete("/api/adapters/first")
        assert deleted.status_code == 200 and client.get("/api/adapters").json() == []
        assert client.delete("/api/adapters/first").status_code == 404


def test_the_readmes_curl_example_sends_a_shipped_config_that_starts_a_run(start_server, tiny_model, tmp_path):
    """The README's server example as written: the file it posts ships in the repository and
    starts a job in a workspace where the quickstart has built its model; an empty body (curl
    with a missing file) is a 422 that says so."""
    (sent,) = re.findall(r"-d @(\S+)", (ROOT / "README.md").read_text())
    workspace = tmp_path / "workspace"
    (workspace / "models").mkdir(parents=True)
    (workspace / "models" / "tiny-llama").symlink_to(tiny_model)
    server = start_server(workspace=workspace)
    headers = {"Content-Type": "application/json"}
    with server.client() as client:
        started = client.post("/api/training/start", content=(ROOT / sent).read_bytes(), headers=headers)
        assert started.status_code == 202, started.text
        job_id = started.json()["id"]
        wait_for(client, job_id, lambda j: j["state"] == "running" and j["update"] >= 1)
        assert client.post(f"/api/training/jobs/{job_id}/stop").status_code == 200
        assert wait_for(client, job_id, lambda j: j["state"] not in ("running", "queued"))["state"] == "cancelled"

        empty = client.post("/api/training/start", content=b"", headers=headers)
        assert empty.status_code == 422 and empty.json()["problems"][0].startswith("request body: empty;")


def test_queue_stop_and_exact_resume(start_server, tiny_model):
    server = start_server()
    with server.client() as client:
        long_id = client.post("/api/training/start", json=job_config(tiny_model, "long", iters=120)).json()["id"]
        short_id = client.post("/api/training/start", json=job_config(tiny_model, "short", iters=2)).json()["id"]
        straight_id = client.post("/api/training/start", json=job_config(tiny_model, "straight", iters=120)).json()["id"]
        wait_for(client, long_id, lambda j: j["state"] == "running" and j["update"] >= 3)
        assert client.get(f"/api/training/jobs/{short_id}").json()["state"] == "queued"
        assert client.get("/api/health").json()["status"] == "busy"

        assert client.post(f"/api/training/jobs/{long_id}/stop").status_code == 200
        stopped = wait_for(client, long_id, lambda j: j["state"] not in ("running", "queued"))
        assert stopped["state"] == "cancelled" and stopped["update"] < 120 and stopped["resumable"]
        wait_for(client, short_id, lambda j: j["state"] == "succeeded")  # the queue moves on, in order

        resumed = client.post(f"/api/training/jobs/{long_id}/resume")
        assert resumed.status_code == 202 and resumed.json()["state"] == "queued"
        done = wait_for(client, long_id, lambda j: j["state"] in ("succeeded", "failed"))
        assert done["state"] == "succeeded" and done["update"] == 120 and not done["resumable"], done
        updates = [m["update"] for m in client.get(f"/api/training/jobs/{long_id}/metrics").json() if "loss" in m]
        assert updates == list(range(1, 121))
        again = client.post(f"/api/training/jobs/{long_id}/resume")
        assert again.status_code == 409 and "succeeded" in again.json()["problems"][0]
        straight = wait_for(client, straight_id, lambda j: j["state"] in ("succeeded", "failed"))
        assert straight["state"] == "succeeded", straight
    # Stopped and resumed, the run trained the adapter an uninterrupted run of the same config trains.
    resumed_weights, straight_weights = (load_file(Path(job["run_dir"]) / "adapters.safetensors")
                                         for job in (done, straight))
    assert resumed_weights.keys() == straight_weights.keys()
    for name, weight in straight_weights.items():
        np.testing.assert_allclose(resumed_weights[name], weight, atol=1e-5, err_msg=name)


def test_bad_requests_are_refused_with_every_problem(start_server, tiny_model, tmp_path):
    from click.testing import CliRunner

    from mlx_surgical.cli import cli

    server = start_server("--max-body-mb", "1")
    bad = job_config(tiny_model, "bad")
    bad["training"]["lerning_rate"] = 1
    bad["lora"]["rank"] = 0
    with server.client() as client:
        refused = client.post("/api/training/start", json=bad)
        assert refused.status_code == 422
        problems = refused.json()["problems"]
        assert len(problems) == 2
        config_file = tmp_path / "bad.json"
        config_file.write_text(json.dumps(bad))
        cli_lines = CliRunner().invoke(cli, ["validate", str(config_file)]).output
        for p in problems:  # the same words as `mlx-surgical validate`
            assert p.split(": ", 1)[1] in cli_lines

        escape = job_config(tiny_model, "escape")
        escape["data"] = {"train": "../../etc/passwd.jsonl"}
        refused = client.post("/api/training/start", json=escape)
        assert refused.status_code == 422 and "outside the workspace" in refused.json()["problems"][0]
        unknown = job_config(tiny_model, "unknown")
        unknown["data"] = {"train": "bundled:nope"}
        refused = client.post("/api/training/start", json=unknown)
        assert refused.status_code == 422 and len(refused.json()["problems"]) == 1, refused.json()
        escape["lora"] = {"rank": 0}  # every problem at once: the config's and the workspace's
        refused = client.post("/api/training/start", json=escape)
        assert refused.status_code == 422 and len(refused.json()["problems"]) == 2, refused.json()
        assert "lora.rank" in refused.json()["problems"][0] and "outside the workspace" in refused.json()["problems"][1]
        elsewhere = job_config(tiny_model, "elsewhere")
        elsewhere["output"]["dir"] = "/tmp"
        assert client.post("/api/training/start", json=elsewhere).status_code == 422
        sneaky = job_config(tiny_model, "../other")
        assert client.post("/api/training/start", json=sneaky).status_code == 422
        too_long = client.post("/api/training/start", json=job_config(tiny_model, "x" * 300))
        assert too_long.status_code == 422 and "output.name" in too_long.json()["problems"][0]
        half = job_config(tiny_model, "half")
        half["data"]["examples"] = [{"instruction": "a\ud800", "response": "b"}]
        for route in ("validate", "start"):  # the escape as JSON sends it: "\ud800" is half of a character
            refused = client.post(f"/api/training/{route}", content=json.dumps(half),
                                  headers={"Content-Type": "application/json"})
            assert refused.status_code == 422 and "not text at character 2" in refused.json()["problems"][0]

        for query in ("offset=abc", "limit=1.5"):
            wrong = client.get(f"/api/training/jobs?{query}")
            assert wrong.status_code == 422 and wrong.json()["problems"][0].startswith(f"query.{query.split('=')[0]}: ")

        huge = client.post("/api/training/start", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                           headers={"Content-Type": "application/json"})
        assert huge.status_code == 413
        malformed = client.post("/api/training/start", content=b"{not json",
                                headers={"Content-Type": "application/json"})
        assert malformed.status_code == 422 and "malformed JSON" in malformed.json()["problems"][0]
        deep = client.post("/api/training/start", content=b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
                           headers={"Content-Type": "application/json"})
        assert deep.status_code == 422 and "nested too deeply" in deep.json()["problems"][0]
        missing = job_config(tiny_model, "missing")
        missing["data"] = {"train": "missing.jsonl"}
        refused = client.post("/api/training/start", json=missing)
        assert refused.status_code == 422 and refused.json()["problems"] == [
            "missing.jsonl: data file not found; check data.train in the config"]
        too_big = job_config(tiny_model, "too-big")
        too_big["lora"]["rank"] = 2 ** 20
        refused = client.post("/api/training/start", json=too_big)
        assert refused.status_code == 422 and "lora.rank: 1048576 exceeds" in refused.json()["problems"][0]
        assert client.get("/api/training/jobs/0123456789ab").status_code == 404
        assert client.get("/api/adapters/nothing").status_code == 404

        first = client.post("/api/training/start", json=job_config(tiny_model, "taken", iters=2))
        assert first.status_code == 202
        clash = client.post("/api/training/start", json=job_config(tiny_model, "taken", iters=2))
        assert clash.status_code == 409 and "already exists" in clash.json()["problems"][0], clash.text
        wait_for(client, first.json()["id"], lambda j: j["state"] == "succeeded")


def test_uploads_and_validate_answer_in_validate_words(start_server, tiny_model):
    server = start_server()
    with server.client() as client:
        text = "".join(json.dumps(e) + "\n" for e in EXAMPLES)
        saved = client.post("/api/uploads", json={"name": "mine.jsonl", "text": text})
        assert saved.status_code == 200 and saved.json()["examples"] == len(EXAMPLES)
        path = saved.json()["path"]
        assert path.startswith("uploads/") and path.endswith("-mine.jsonl")
        assert client.post("/api/uploads", json={"name": "mine.jsonl", "text": text}).json()["path"] == path

        bad = client.post("/api/uploads", json={"name": "bad.jsonl", "text": text + "{oops\n"})
        assert bad.status_code == 422
        assert bad.json()["problems"] == [f"bad.jsonl:{len(EXAMPLES) + 1}: malformed JSON line (Expecting property "
                                          "name enclosed in double quotes at column 2); each line must be one JSON "
                                          "object"]
        assert client.post("/api/uploads", json={"name": "../x.jsonl", "text": text}).status_code == 422
        assert client.post("/api/uploads", json={"name": "notes.txt", "text": text}).status_code == 422

        config = job_config(tiny_model, "checked")
        config["data"] = {"train": path}
        valid = client.post("/api/training/validate", json=config)
        assert valid.status_code == 200, valid.text
        assert valid.json()["run_name"] == "checked" and f"train: {len(EXAMPLES)} examples" in valid.json()["notes"]
        config["training"]["learning_rate"] = 0
        refused = client.post("/api/training/validate", json=config)
        assert refused.status_code == 422
        assert refused.json()["problems"] == ["config: training.learning_rate: must be positive"]
        assert client.get("/api/training/jobs").json() == []  # validating starts nothing

        presets = {p["name"]: p["config"] for p in client.get("/api/presets").json()}
        assert {"surgical", "nuclear", "tiny"} <= set(presets) and presets["surgical"]["lora"]["rank"] == 8
        settings = client.get("/api/config/settings").json()
        assert settings["training"]["learning_rate"]["default"] == 1e-4
        assert settings["model"]["dtype"]["choices"] == ["auto", "float32", "float16", "bfloat16"]


def test_token_and_bind_safety(start_server, tmp_path):
    server = start_server("--token", "s3cret")
    assert server.banner[0].endswith(f"http://127.0.0.1:{server.port}/?token=s3cret")
    assert "token is required" in server.banner[2]
    with server.client() as client:
        assert client.get("/api/health").json() == {"status": "up"}  # says nothing more without the token
        assert client.get("/api/health", headers={"Authorization": "Bearer s3cret"}).json()["version"]
        assert client.get("/api/training/jobs").status_code == 401
        assert client.get("/api/training/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/training/jobs", headers={"Authorization": "Bearer s3cret"}).json() == []
        assert client.get("/api/training/jobs", headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert client.get("/openapi.json").status_code == 401
        page = client.get("/")  # the dashboard itself holds no data: it asks for the token
        assert page.status_code == 200 and "/static/app.js" in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert client.get("/static/vendor/uPlot.LICENSE").status_code == 200
    refused = subprocess.run([sys.executable, "-m", "mlx_surgical", "serve", "--host", "0.0.0.0", "--port",
                              str(free_port()), "--workspace", str(tmp_path)], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2 and "--token" in refused.stderr


def test_jobs_survive_a_server_restart_and_an_interrupted_job_resumes(start_server, tiny_model, tmp_path):
    workspace = tmp_path / "workspace"
    server = start_server(workspace=workspace)
    with server.client() as client:
        done_id = client.post("/api/training/start", json=job_config(tiny_model, "done", iters=2)).json()["id"]
        wait_for(client, done_id, lambda j: j["state"] == "succeeded")
        cut_id = client.post("/api/training/start", json=job_config(tiny_model, "cut", iters=120)).json()["id"]
        wait_for(client, cut_id, lambda j: j["state"] == "running" and j["update"] >= 3)
    server.close(signal.SIGKILL)
    job_file = workspace / "jobs" / cut_id / "job.json"
    deadline = time.time() + 60  # the orphaned worker notices, checkpoints and stops
    while json.loads(job_file.read_text())["state"] == "running" and time.time() < deadline:
        time.sleep(0.1)

    restarted = start_server(workspace=workspace)
    with restarted.client() as client:
        states = {j["id"]: j["state"] for j in client.get("/api/training/jobs").json()}
        assert states == {done_id: "succeeded", cut_id: "interrupted"}
        assert client.post(f"/api/training/jobs/{cut_id}/resume").status_code == 202
        done = wait_for(client, cut_id, lambda j: j["state"] in ("succeeded", "failed"))
        assert done["state"] == "succeeded" and done["update"] == 120


def test_a_crashing_worker_fails_its_job_and_the_server_carries_on(start_server, tiny_model, tmp_path):
    import os
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    server = start_server()
    with server.client() as client:
        refused = client.post("/api/training/start", json=job_config(broken, "broken"))  # validate reads the header
        assert refused.status_code == 422 and "model.safetensors: it is not a whole safetensors file" in refused.text
        crash_id = client.post("/api/training/start", json=job_config(tiny_model, "crash", iters=120)).json()["id"]
        good_id = client.post("/api/training/start", json=job_config(tiny_model, "fine", iters=2)).json()["id"]
        running = wait_for(client, crash_id, lambda j: j["state"] == "running" and j["update"] >= 1)
        os.kill(running["worker_pid"], signal.SIGKILL)  # as the kernel's OOM killer would
        failed = wait_for(client, crash_id, lambda j: j["state"] not in ("queued", "running"))
        assert failed["state"] == "failed" and "ended unexpectedly (exit code -9)" in failed["error"]
        assert wait_for(client, good_id, lambda j: j["state"] != "queued" and j["state"] != "running")["state"] \
            == "succeeded"
        deadline = time.time() + 30  # the worker process exits just after it records the result
        while client.get("/api/health").json()["status"] != "idle" and time.time() < deadline:
            time.sleep(0.1)
        assert client.get("/api/health").json()["status"] == "idle"


def test_other_web_pages_cannot_drive_the_server(start_server, tiny_model):
    """What a hostile page can make a browser send: a simple (unpreflighted) cross-origin POST with
    a text/plain or form body, and any request under a rebound DNS name."""
    server = start_server("--allow-host", "proxy.example")
    own = f"http://127.0.0.1:{server.port}"
    body = json.dumps(job_config(tiny_model, "sneaked", iters=1))
    refused = [
        ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403),
        ({"Origin": "http://evil.example", "Content-Type": "application/json"}, 403),
        ({"Origin": "null", "Content-Type": "application/json"}, 403),
        ({"Origin": f"http://127.0.0.1:{free_port()}", "Content-Type": "application/json"}, 403),  # another local app
        ({"Origin": own, "Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"}, 403),
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ({"Host": "evil.example", "Content-Type": "application/json"}, 403),
        ({"Host": f"attacker.example:{server.port}", "Content-Type": "application/json"}, 403),
    ]
    with server.client() as client:
        for headers, status in refused:
            answer = client.post("/api/training/start", content=body, headers=headers)
            assert answer.status_code == status, (headers, answer.text)
            assert answer.json()["problems"], headers
        assert client.get("/api/training/jobs").json() == []
        preflight = client.options("/api/training/start", headers={"Origin": "http://evil.example",
                                                                   "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
        for path in ("/api/health", "/api/training/jobs", "/api/adapters", "/"):  # DNS rebinding reads nothing
            assert client.get(path, headers={"Host": f"rebound.example:{server.port}"}).status_code == 403

        for host in ("localhost", "[::1]", "127.0.0.1", "proxy.example", "PROXY.example"):
            assert client.get("/api/training/jobs", headers={"Host": f"{host}:{server.port}"}).status_code == 200
        assert client.get("/api/health", headers={"Origin": "https://proxy.example"}).status_code == 200
        same = client.post("/api/training/start", content=body,
                           headers={"Origin": own, "Content-Type": "application/json; charset=utf-8"})
        assert same.status_code == 202, same.text  # the dashboard's own request
        wait_for(client, same.json()["id"], lambda j: j["state"] == "succeeded")


def test_an_evaluation_job_in_the_same_queue_returns_its_report(start_server, tiny_model, tmp_path):
    workspace = tmp_path / "workspace"
    server = start_server(workspace=workspace)
    problems = [{**e, "tests": [f"assert f{i}(1) == {1 + i}"], "concept": "even" if i % 2 == 0 else "odd"}
                for i, e in enumerate(EXAMPLES)]
    (workspace / "held_out.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems[:3]))
    with server.client() as client:
        trained = client.post("/api/training/start", json=job_config(tiny_model, "evaluated", iters=2)).json()["id"]
        early = client.post("/api/adapters/evaluated/eval", json={})  # the worker is still starting
        assert early.status_code == 422 and "still training" in early.json()["problems"][0]
        bodiless = client.post("/api/adapters/evaluated/eval")  # no body: the same as {}
        assert bodiless.status_code == 422 and "still training" in bodiless.json()["problems"][0]
        wait_for(client, trained, lambda j: j["state"] == "succeeded")

        refused = client.post("/api/adapters/evaluated/eval", json={
            "examples": [{"instruction": "Say hi", "response": "hi"}], "eval": {"samples": 1, "colour": 2}})
        assert refused.status_code == 422
        assert refused.json()["problems"] == [
            "request: eval.colour: unknown key; known keys: enabled, samples, temperature, max_tokens, generations, "
            "timeout_seconds, memory_mb, seed",
            "request: examples[0]: no tests to run, but samples is 1; add 'test' + 'entry_point' or 'tests' to this "
            "example, or leave samples unset"]
        outside = client.post("/api/adapters/evaluated/eval", json={"data": "../../etc/passwd"})
        assert outside.status_code == 422 and "outside the workspace" in outside.json()["problems"][0]
        nul = client.post("/api/adapters/evaluated/eval", json={"data": "held\u0000out.jsonl"})
        assert nul.status_code == 422 and "contains a NUL character" in nul.json()["problems"][0]
        assert client.post("/api/adapters/nothing/eval", json={}).status_code == 404
        (workspace / "empty.jsonl").write_text("")
        empty = client.post("/api/adapters/evaluated/eval", json={"data": "empty.jsonl"})
        assert empty.status_code == 422 and "no examples to evaluate on" in empty.json()["problems"][0]
        config = job_config(tiny_model, "no-valid", iters=1)
        del config["data"]["valid_examples"]
        no_valid = client.post("/api/training/start", json=config).json()["id"]
        wait_for(client, no_valid, lambda j: j["state"] == "succeeded")
        unsplit = client.post("/api/adapters/no-valid/eval", json={})
        assert unsplit.status_code == 422 and "no validation split" in unsplit.json()["problems"][0], unsplit.text

        queued = client.post("/api/adapters/evaluated/eval",
                             json={"data": "held_out.jsonl", "eval": {"max_tokens": 8, "generations": 1}})
        assert queued.status_code == 202, queued.text
        job_id = queued.json()["id"]
        done = wait_for(client, job_id, lambda j: j["state"] not in ("queued", "running"))
        assert done["state"] == "succeeded" and done["kind"] == "eval", done
        report = client.get(f"/api/training/jobs/{job_id}/report").json()
        assert report["works"]["problems"] == 3 and set(report["concepts"]) == {"even", "odd"}
        assert report["settings"]["max_tokens"] == 8
        assert client.get("/api/adapters/evaluated").json()["eval"] == report["summary"]
        stream = client.get(f"/api/training/jobs/{job_id}/events").text
        events = [json.loads(line[len("data: "):]) for line in stream.splitlines() if line.startswith("data: ")]
        assert any(e.get("type") == "log" for e in events) and {"type": "end", "state": "succeeded",
                                                                "error": None} in events
        assert client.get(f"/api/training/jobs/{trained}/report").status_code == 404
        resumed = client.post(f"/api/training/jobs/{job_id}/resume")
        assert resumed.status_code == 422 and "evaluation" in resumed.json()["problems"][0]


def test_small_records_a_page_at_a_time_deleted_and_pruned(start_server, tiny_model, tmp_path):
    from mlx_surgical.config import config_from_dict
    from mlx_surgical.jobs import JobStore

    workspace = tmp_path / "workspace"
    store = JobStore(workspace)
    ids = []
    for i in range(8):
        config = config_from_dict(job_config(tiny_model, f"old-{i}"))
        config.output.dir = str(store.adapters)
        job = store.create(config)
        with store.locked(job.id) as record:
            record.state = "succeeded"
        ids.append(job.id)
    server = start_server("--keep-jobs", "6", workspace=workspace)
    with server.client() as client:
        first = client.get("/api/training/jobs", params={"limit": 4})
        assert first.headers["X-Total-Count"] == "6"  # the two oldest finished jobs were pruned
        assert [j["id"] for j in first.json()] == ids[:3:-1]  # newest first
        assert [j["id"] for j in client.get("/api/training/jobs", params={"offset": 4}).json()] == ids[3:1:-1]
        assert not (workspace / "jobs" / ids[0]).exists() and not (workspace / "jobs" / ids[1]).exists()
        assert client.get("/api/training/jobs", params={"limit": 0}).status_code == 422

        assert client.delete(f"/api/training/jobs/{ids[5]}").status_code == 204
        assert client.get(f"/api/training/jobs/{ids[5]}").status_code == 404
        assert client.delete(f"/api/training/jobs/{ids[5]}").status_code == 404

        running = client.post("/api/training/start", json=job_config(tiny_model, "busy", iters=30)).json()["id"]
        wait_for(client, running, lambda j: j["state"] == "running" and j["update"] >= 2)
        assert client.delete(f"/api/training/jobs/{running}").status_code == 409
        client.post(f"/api/training/jobs/{running}/stop")
        wait_for(client, running, lambda j: j["state"] == "cancelled")
        assert client.post(f"/api/training/jobs/{running}/resume", json={"learning_rate": "low"}).status_code == 422
        assert client.post(f"/api/training/jobs/{running}/resume", json={"learning_rate": 5e-3}).status_code == 202
        done = wait_for(client, running, lambda j: j["state"] not in ("queued", "running"))
        assert done["state"] == "succeeded" and done["update"] == 30, done
        changes = json.loads((workspace / "adapters" / "busy" / "run.json").read_text())["learning_rate_changes"]
        assert [(c["learning_rate"], c["previous"]) for c in changes] == [(5e-3, 1e-2)]
        assert client.delete(f"/api/training/jobs/{running}").status_code == 204
    # The status record stays small: the config and its inline examples are written once beside it.
    record = (workspace / "jobs" / ids[7] / "job.json").read_text()
    assert "examples" not in record and len(record) < 1000
    assert json.loads((workspace / "jobs" / ids[7] / "config.json").read_text())["data"]["examples"] == EXAMPLES


def test_a_job_record_from_before_config_json_keeps_its_config(tiny_model, tmp_path):
    from mlx_surgical.jobs import JobStore

    store = JobStore(tmp_path / "workspace")
    config = job_config(tiny_model, "old")
    folder = store.root / "0123456789ab"
    folder.mkdir()
    (folder / "job.json").write_text(json.dumps({"id": "0123456789ab", "seq": 1, "run_name": "old", "state": "failed",
                                                 "run_dir": str(store.adapters / "old"), "config": config}))
    with store.locked("0123456789ab") as job:  # rewriting the record (a resume) must not lose the config
        job.state = "queued"
    assert "config" not in json.loads((folder / "job.json").read_text())
    assert store.config("0123456789ab") == config and store.get("0123456789ab").state == "queued"


def test_a_busy_port_and_an_unknown_host_are_named(tmp_path):
    from click.testing import CliRunner

    from mlx_surgical.cli import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(cli, ["serve", "--port", str(port), "--workspace", str(tmp_path)])
    assert busy.exit_code == 2 and f"--port {port}: already in use on 127.0.0.1" in busy.output, busy.output
    unknown = CliRunner().invoke(cli, ["serve", "--host", "nonexistent.invalid", "--token", "t", "--workspace",
                                       str(tmp_path)])
    assert unknown.exit_code == 2 and "--host nonexistent.invalid: cannot listen there" in unknown.output
    assert "--port" not in unknown.output
