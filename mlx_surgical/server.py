"""The local REST server: HTTP routes that translate to jobs.py, registry.py and export/.

    curl -X POST http://127.0.0.1:5001/api/training/start -H "Content-Type: application/json" \\
         -d @surgical_training_config_full.json

The body is the same JSON config the CLI takes (examples inline, or files inside the
workspace). Training runs in a worker process, one job at a time; the server only answers.
"""

import asyncio
import json
import secrets
import shutil
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from . import __version__
from .backend import describe
from .errors import NotFound, UserError
from .export import export_adapter
from .jobs import FINISHED, JobStore, Scheduler, prepare_config
from .registry import find, list_adapters, show
from .rundir import RunDir

DEFAULT_MAX_BODY = 20 * 1024 * 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def problem(status: int, *problems: str) -> JSONResponse:
    return JSONResponse({"problems": list(problems)}, status_code=status)


def create_app(workspace: Path, token: Optional[str] = None, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    store = JobStore(workspace)
    scheduler = Scheduler(store)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.shutdown()

    app = FastAPI(title="mlx_surgical", version=__version__, lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token and request.url.path != "/api/health":
            sent = request.headers.get("authorization", "")
            if not secrets.compare_digest(sent, f"Bearer {token}"):
                return problem(401, "missing or wrong token: send 'Authorization: Bearer <token>'")
        length = request.headers.get("content-length")
        if length is not None and int(length) > max_body:
            return problem(413, f"request body is {int(length):,} bytes; the limit is {max_body:,}")
        return await call_next(request)

    @app.exception_handler(NotFound)
    async def not_found(request, exc: NotFound):
        return problem(404, *exc.problems)

    @app.exception_handler(UserError)
    async def user_error(request, exc: UserError):
        return problem(422, *exc.problems)

    @app.get("/api/health")
    async def health():
        return {"version": __version__, **describe(), "status": "busy" if scheduler.busy else "idle"}

    @app.post("/api/training/start", status_code=202)
    async def start(request: Request):
        body = await request.body()
        if len(body) > max_body:  # a chunked body has no content-length to check up front
            return problem(413, f"request body is over the limit of {max_body:,} bytes")
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return problem(422, f"config: malformed JSON: {e}")
        config = await asyncio.to_thread(prepare_config, raw, store)
        job = store.create(config)
        return {"id": job.id, "state": job.state, "run_name": job.run_name}

    @app.get("/api/training/jobs")
    async def jobs():
        return [j.public() for j in store.all()]

    @app.get("/api/training/jobs/{job_id}")
    async def job(job_id: str):
        return store.get(job_id).public()

    @app.get("/api/training/jobs/{job_id}/metrics")
    async def metrics(job_id: str):
        return RunDir(Path(store.get(job_id).run_dir)).metric_rows()

    @app.get("/api/training/jobs/{job_id}/events")
    async def events(job_id: str):
        store.get(job_id)

        async def stream():
            sent = 0
            while True:
                current = store.get(job_id)  # read before the events: a finished job has written them all
                events = store.events(job_id)
                for event in events[sent:]:
                    yield f"data: {json.dumps(event)}\n\n"
                sent = len(events)
                if current.state in FINISHED:
                    yield f"event: state\ndata: {json.dumps(current.public())}\n\n"
                    return
                await asyncio.sleep(0.2)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/api/training/jobs/{job_id}/stop")
    async def stop(job_id: str):
        store.get(job_id)
        return scheduler.stop(job_id).public()

    @app.post("/api/training/jobs/{job_id}/resume", status_code=202)
    async def resume(job_id: str):
        store.get(job_id)
        return scheduler.resume(job_id).public()

    @app.get("/api/adapters")
    async def adapters():
        return [e.to_dict() for e in list_adapters(store.adapters)]

    @app.get("/api/adapters/{name}")
    async def adapter(name: str):
        return show(store.adapters, _plain(name))

    @app.get("/api/adapters/{name}/export")
    async def export(name: str, format: str = "mlx"):
        if format not in ("mlx", "peft", "gguf"):
            return problem(422, f"format: unknown format '{format}'; choose mlx, peft or gguf")
        run_dir = find(store.adapters, _plain(name))
        scratch = Path(tempfile.mkdtemp(prefix="export-"))
        out = await asyncio.to_thread(export_adapter, run_dir, format, scratch / f"{run_dir.name}-{format}")
        archive = shutil.make_archive(str(scratch / f"{run_dir.name}-{format}"), "zip",
                                      root_dir=out.parent, base_dir=out.name)
        return FileResponse(archive, filename=Path(archive).name, media_type="application/zip",
                            background=BackgroundTask(shutil.rmtree, scratch, True))

    return app


def _plain(name: str) -> str:
    """Adapter names in URLs are plain names, never paths."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"adapter name '{name}': use a plain run name")
    return name


def check_bind(host: str, token: Optional[str], allow_remote: bool) -> None:
    if host not in LOOPBACK and not token and not allow_remote:
        raise UserError(f"--host {host}: binding beyond loopback without --token would let anyone on the network "
                        "train and download adapters; pass --token (or --allow-remote to accept that)")


def serve(host: str, port: int, workspace: Path, token: Optional[str], allow_remote: bool = False,
          max_body: int = DEFAULT_MAX_BODY) -> None:
    import uvicorn

    check_bind(host, token, allow_remote)
    uvicorn.run(create_app(workspace, token, max_body), host=host, port=port, log_level="warning")
