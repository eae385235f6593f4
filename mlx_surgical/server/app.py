"""The local REST server: HTTP routes that translate to jobs.py, registry.py and export/, and
the dashboard at `/`, which calls these same routes and nothing else.

    curl -X POST http://127.0.0.1:5001/api/training/start -H "Content-Type: application/json" \\
         -d @configs/tiny.json

The body is the same JSON config the CLI takes (examples inline, or files inside the
workspace). Training runs in a worker process, one job at a time; the server only answers.
Every request first passes guard.RequestGuard.
"""

import asyncio
import errno
import json
import shutil
import socket
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from .. import __version__
from ..backend import describe
from ..config import ServeConfig, parse_json_file, preset_names, preset_path, settings_help
from ..errors import Conflict, NotFound, UserError, parse_user_json
from ..export import export_archive
from ..jobs import JobStore, Scheduler
from ..registry import find, list_adapters, show, verify
from ..rundir import RunDir, load_run_config
from .guard import LOOPBACK, WILDCARD, RequestGuard, problem
from .workspace import prepare_config, prepare_eval, remove_run, save_upload

STATIC = Path(__file__).parent / "static"
# The dashboard loads only its own files and talks only to this server; no page may frame it.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'",
                "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


class BodyTooLarge(UserError):
    """A body over --max-body-mb (HTTP 413)."""


def create_app(settings: ServeConfig = ServeConfig()) -> FastAPI:
    """The app for a server bound to `settings.host`; `settings.allow_hosts` are further names
    clients may use in Host and Origin (a reverse proxy's). Refuses (Conflict) a workspace
    another server runs."""
    store = JobStore(Path(settings.workspace))
    scheduler = Scheduler(store, keep_finished=settings.keep_jobs)
    scheduler.claim()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.shutdown()

    app = FastAPI(title="mlx_surgical", version=__version__, lifespan=lifespan)
    max_body = settings.max_body_bytes
    app.add_middleware(RequestGuard, token=settings.token, bound_host=settings.host, allow_hosts=settings.allow_hosts,
                       max_body=max_body)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def json_body(request: Request, if_empty=None, expected: str = "a run config such as configs/tiny.json "
                                                                          "(curl -d @configs/tiny.json)"):
        """The request's JSON; `if_empty` (when given) stands for an empty body, else an empty
        body is refused naming what the route `expected`."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:  # a chunked body has no content-length to check up front
                raise BodyTooLarge(f"request body is over the limit of {max_body:,} bytes")
        if not body.strip():
            if if_empty is not None:
                return if_empty
            raise UserError(f"request body: empty; send {expected}")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"request body: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return parse_user_json(text, "request body")

    def in_workspace(name: str) -> Path:
        """A run of the workspace by its plain name (never a folder elsewhere, such as the server's own)."""
        return find(store.adapters, _plain(name), paths=False)

    def relative(text: str) -> str:
        """Answers name files inside the workspace relative to it, never by the server's own paths."""
        return text.replace(f"{store.workspace}/", "").replace(str(store.workspace), ".")

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, exc: BodyTooLarge):
        return problem(413, *exc.problems)

    @app.exception_handler(NotFound)
    async def not_found(request, exc: NotFound):
        return problem(404, *map(relative, exc.problems))

    @app.exception_handler(Conflict)
    async def conflict(request, exc: Conflict):
        return problem(409, *map(relative, exc.problems))

    @app.exception_handler(UserError)
    async def user_error(request, exc: UserError):
        return problem(422, *map(relative, exc.problems))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        """A query parameter of the wrong type, in the same {"problems": [...]} form as every refusal."""
        return problem(422, *(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors()))

    @app.get("/", include_in_schema=False)
    async def dashboard():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/api/health")
    async def health(request: Request):
        if not request.state.authorized:
            return {"status": "up"}
        return {"version": __version__, **describe(), "status": "busy" if scheduler.busy else "idle",
                "workspace": str(store.workspace)}

    @app.get("/api/presets")
    async def presets():
        return [{"name": name, "config": parse_json_file(preset_path(name))} for name in preset_names()]

    @app.get("/api/config/settings")
    async def config_settings():
        return settings_help()

    @app.post("/api/uploads")
    async def upload(request: Request):
        upload = await json_body(request, expected='{"name": "train.jsonl", "text": "<the file>"}')
        return await asyncio.to_thread(save_upload, store, upload)

    @app.post("/api/training/validate")
    async def validate(request: Request):
        config, notes = await asyncio.to_thread(prepare_config, await json_body(request), store)
        return {"notes": notes, "run_name": config.output.name}

    @app.post("/api/training/start", status_code=202)
    async def start(request: Request):
        config, _ = await asyncio.to_thread(prepare_config, await json_body(request), store)
        job = store.create(config)
        scheduler.notify()
        return {"id": job.id, "state": job.state, "run_name": job.run_name}

    @app.get("/api/training/jobs")
    async def jobs(offset: int = 0, limit: int = 100):
        """Newest first, a page at a time; X-Total-Count says how many there are."""
        if offset < 0 or not 1 <= limit <= 1000:
            return problem(422, "offset must be 0 or more and limit between 1 and 1000")
        page, total = store.page(offset, limit)
        return JSONResponse([j.public() for j in page], headers={"X-Total-Count": str(total)})

    @app.get("/api/training/jobs/{job_id}")
    async def job(job_id: str):
        return store.get(job_id).public()

    @app.delete("/api/training/jobs/{job_id}", status_code=204)
    async def delete_job(job_id: str):
        scheduler.delete(job_id)

    @app.get("/api/training/jobs/{job_id}/metrics")
    async def metrics(job_id: str):
        return RunDir(Path(store.get(job_id).run_dir)).metric_rows()

    @app.get("/api/training/jobs/{job_id}/events")
    async def events(job_id: str):
        store.get(job_id)

        async def stream():  # server-sent events: the final state as its own event type
            async for kind, data in store.follow(job_id):
                yield ("event: state\n" if kind == "state" else "") + f"data: {json.dumps(data)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/api/training/jobs/{job_id}/stop")
    async def stop(job_id: str):
        store.get(job_id)
        return scheduler.stop(job_id).public()

    @app.post("/api/training/jobs/{job_id}/resume", status_code=202)
    async def resume(job_id: str, request: Request):
        """An optional body {"learning_rate": X} sets a new peak learning rate from the checkpoint on."""
        store.get(job_id)
        options = await json_body(request, if_empty={})
        if not isinstance(options, dict) or set(options) - {"learning_rate"}:
            return problem(422, 'request body: send nothing or {"learning_rate": X}')
        return scheduler.resume(job_id, options.get("learning_rate")).public()

    @app.get("/api/training/jobs/{job_id}/report")
    async def report(job_id: str):
        return store.report(job_id)

    @app.post("/api/adapters/{name}/eval", status_code=202)
    async def evaluate(name: str, request: Request):
        request_body = await json_body(request, if_empty={})  # {}: the run's validation split, its settings
        run_dir, eval_request = await asyncio.to_thread(prepare_eval, request_body, _plain(name), store)
        job = store.create_eval(run_dir, eval_request)
        scheduler.notify()
        return {"id": job.id, "state": job.state, "run_name": job.run_name}

    @app.get("/api/adapters")
    async def adapters():
        return [e.to_dict() for e in list_adapters(store.adapters)]

    @app.get("/api/adapters/{name}")
    async def adapter(name: str):
        return show(store.adapters, _plain(name), paths=False)

    @app.delete("/api/adapters/{name}")
    async def delete_adapter(name: str):
        await asyncio.to_thread(remove_run, store, in_workspace(name).name)
        return {"deleted": name}

    @app.post("/api/adapters/{name}/verify")
    async def verify_adapter(name: str):
        return {"checked": await asyncio.to_thread(verify, store.adapters, str(in_workspace(name)))}

    @app.get("/api/adapters/{name}/metrics")
    async def adapter_metrics(name: str):
        return RunDir(in_workspace(name)).metric_rows()

    @app.get("/api/adapters/{name}/config")
    async def adapter_config(name: str):
        return parse_json_file(RunDir(in_workspace(name)).config, "run config")

    @app.get("/api/adapters/{name}/plan")
    async def adapter_plan(name: str):
        from ..plan import plan_run  # loads MLX (the plan reads the tokenizer), as validating does

        config = load_run_config(in_workspace(name))
        return await asyncio.to_thread(plan_run, config, probe=False)

    @app.get("/api/adapters/{name}/export")
    async def export(name: str, format: str = "mlx"):
        scratch = Path(tempfile.mkdtemp(prefix="export-"))
        try:
            archive = await asyncio.to_thread(export_archive, in_workspace(name), format, scratch)
        except BaseException:
            shutil.rmtree(scratch, True)
            raise
        return FileResponse(archive, filename=archive.name, media_type="application/zip",
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


def dashboard_url(host: str, port: int, token: Optional[str], allow_hosts: Iterable[str] = ()) -> str:
    """The address to open: a wildcard bind is reached through an allowed name or loopback."""
    name = host if host not in WILDCARD else next(iter(allow_hosts), "127.0.0.1")
    name = f"[{name}]" if ":" in name else name
    return f"http://{name}:{port}/" + (f"?token={quote(token, safe='')}" if token else "")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is printed, so a busy port is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every small answer waits 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: already in use on {host}; choose another --port or stop the program "
                            "using it") from None
        raise UserError(f"--host {host}: cannot listen there ({e.strerror}); give an address of this machine, "
                        "such as 127.0.0.1") from None
    return sock


def serve(settings: ServeConfig) -> None:
    import uvicorn

    host, port, token, allow_hosts = settings.host, settings.port, settings.token, settings.allow_hosts
    check_bind(host, token, settings.allow_remote)
    sock = bind(host, port)
    app = create_app(settings)
    lines = [f"mlx-surgical serve: dashboard and API at {dashboard_url(host, port, token, allow_hosts)}",
             f"  workspace {Path(settings.workspace).resolve()}",
             "  a token is required (Authorization: Bearer; the URL above carries it for the dashboard)" if token
             else "  no token: open to every local client; pass --token to require one"]
    if host in WILDCARD and not allow_hosts:
        lines.append("  bound to every interface: name the host clients use with --allow-host NAME")
    print("\n".join(lines), flush=True)
    # Open event streams (a dashboard watching a run) would otherwise hold a Ctrl-C until the job ends.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    server.run(sockets=[sock])
