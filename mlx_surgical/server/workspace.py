"""What the server does to its workspace beyond jobs: confine each request to it (a config's
data files and runs, an evaluation's held-out data), keep uploaded data files, and remove a run
only when no job is still writing it."""

import hashlib
import uuid
from pathlib import Path
from typing import Any, Optional

from ..config import (BUNDLED_PREFIX, MAX_NAME_LENGTH, PLAIN_NAME, OutputConfig, RunConfig, config_from_dict,
                      data_path_problem, eval_problems, is_plain_name, resolve_data_path, resolve_data_paths,
                      section_from_dict)
from ..data import check_records, inline_records, read_records
from ..errors import Conflict, UserError, not_text
from ..files import write_text_atomic
from ..jobs import JobStore
from ..registry import find, remove
from ..rundir import RunDir, default_run_name

UPLOADS = "uploads"
DATA_SUFFIXES = (".jsonl", ".json")


def prepare_config(raw: dict, store: JobStore) -> tuple[RunConfig, list[str]]:
    """The request's config, checked like `mlx-surgical validate` and confined to the
    workspace: data files must resolve inside it and runs are written to its adapters/.
    Returns it with validate's notes."""
    from ..pipeline import validate_run  # loads MLX, which the server otherwise needs only for /api/health's facts

    # The workspace's own rules, read from the request itself so they are reported with the
    # config's (a data file's malformed name is among the config's problems).
    data, output = (raw.get(name) if isinstance(raw, dict) and isinstance(raw.get(name), dict) else {}
                    for name in ("data", "output"))
    problems = [p for name in ("train", "valid")
                if isinstance(value := data.get(name), str) and data_path_problem(value, name) is None
                and (p := outside_workspace(store, value, f"config: data.{name}"))]
    if output.get("dir", OutputConfig.dir) != OutputConfig.dir:
        problems.append("config: output.dir: runs are written to the workspace's adapters/; leave it unset")
    try:  # whether a data file exists is told only of files inside the workspace
        config = config_from_dict(raw, source="config", base_dir=None if problems else store.workspace)
    except UserError as e:
        raise UserError(*e.problems, *problems) from None
    if problems:
        raise UserError(*problems)
    resolve_data_paths(config, store.workspace)
    config.output.dir = str(store.adapters)
    if config.output.name is None:
        # A random tail too: two requests in the same second must not collide.
        config.output.name = f"{default_run_name('run')}-{uuid.uuid4().hex[:4]}"
    store.check_name(config.output.name)  # early, for validate; create() takes the name for good
    model = Path(config.model.path)
    if not model.is_absolute() and (store.workspace / model).exists():
        config.model.path = str(store.workspace / model)
    return config, validate_run(config)


def workspace_file(store: JobStore, value: str, where: str) -> Optional[str]:
    """The problem with a data file's name, or with a file outside the workspace, or None."""
    return data_path_problem(value, where) or outside_workspace(store, value, where)


def outside_workspace(store: JobStore, value: str, where: str) -> Optional[str]:
    """The problem with a data file (its name well formed) outside the workspace, or None."""
    if value.startswith(BUNDLED_PREFIX) or (store.workspace / value).resolve().is_relative_to(store.workspace):
        return None
    return (f"{where}: '{value}' is outside the workspace; send the examples inline or put the file in the "
            "workspace")


def prepare_eval(raw: Any, name: str, store: JobStore) -> tuple[Path, dict]:
    """The run to evaluate and the request, checked like `mlx-surgical eval`'s options: held-out
    examples from a file inside the workspace (`data`) or inline (`examples`), else the run's
    validation split, and eval settings (`eval`) over the run's own."""
    # Checking the examples loads MLX (eval/), as validating a training config does; listing never does.
    from ..eval import held_out_records
    from ..eval.examples import read_examples

    if not isinstance(raw, dict):
        raise UserError("request: expected a JSON object with data or examples, and eval settings")
    problems = [f"request: {key}: unknown key; use data (a file in the workspace), examples (inline) or eval"
                for key in raw if key not in ("data", "examples", "eval")]
    training = store.unfinished(name, "train")
    if training:
        raise UserError(f"adapter '{name}' is still training (job {training[0].id}); queue its evaluation when that "
                        "job has finished, or set eval.enabled in the training config")
    run_dir = find(store.adapters, name, paths=False)
    if not RunDir(run_dir).config.exists():
        problems.append(f"adapter '{name}' is not a run of this workspace (no run_config.json), so its base model "
                        "is unknown; evaluate it with `mlx-surgical eval DIR --model BASE`")
    given = raw.get("eval", {})
    settings = section_from_dict("eval", given, "request", problems)
    problems += [f"request: {p}" for p in eval_problems(settings)]
    overrides = {key: getattr(settings, key) for key in given if hasattr(settings, key)} \
        if isinstance(given, dict) else {}
    data, examples = raw.get("data"), raw.get("examples")
    try:
        if data is not None and examples is not None:
            raise UserError("request: give data or examples, not both")
        if examples is not None:
            if not isinstance(examples, list) or not examples:
                raise UserError("request: examples: expected a non-empty list of examples")
            records = inline_records(examples, "request: examples")
        elif data is not None or RunDir(run_dir).config.exists():
            if data is not None and not isinstance(data, str):
                raise UserError("request: data: expected a file name inside the workspace")
            if data is not None and (outside := workspace_file(store, data, "request: data")):
                raise UserError(outside)
            records, _ = held_out_records(run_dir, data, store.workspace, "request: data",
                                          "data (a file in the workspace) or examples in the request")
            if data is not None:
                data = str(resolve_data_path(data, store.workspace, "request: data"))
        else:
            records = []
        read_examples(records, overrides.get("samples"))
    except UserError as e:
        problems += e.problems
    if problems:
        raise UserError(*problems)
    return run_dir, {"data": data, "examples": examples, "eval": overrides}


def save_upload(store: JobStore, raw: Any) -> dict:
    """Store `{"name": "train.jsonl", "text": "..."}` as `uploads/<hash>-<name>` in the workspace,
    after reading it exactly as training will; the returned path goes in data.train or
    data.valid. The name carries the content's hash, so a queued job's data never changes."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not isinstance(raw.get("text"), str):
        raise UserError('upload: send {"name": "FILE.jsonl", "text": "...the file\'s contents..."}')
    name = raw["name"]
    if Path(name).suffix not in DATA_SUFFIXES or not is_plain_name(name):
        raise UserError(f"upload: '{name[:MAX_NAME_LENGTH]}': name a .jsonl or .json file with {PLAIN_NAME}")
    if problem := not_text(f"upload: '{name}'", raw["text"]):
        raise UserError(problem)
    content = raw["text"].encode("utf-8")
    path = store.workspace / UPLOADS / f"{hashlib.sha256(content).hexdigest()[:12]}-{name}"
    existed = path.exists()
    if not existed:
        path.parent.mkdir(exist_ok=True)
        write_text_atomic(path, raw["text"])
    try:
        records = read_records(path)
        check_records(records, name)
    except UserError as e:
        if not existed:
            path.unlink()
        # Name the user's file, not where the server put it.
        raise UserError(*(p.replace(str(path), name) for p in e.problems)) from None
    return {"path": str(path.relative_to(store.workspace)), "examples": len(records)}


def remove_run(store: JobStore, name: str) -> Path:
    """Delete a run's directory, unless a job is queued for it or training it."""
    if busy := store.unfinished(name):
        raise Conflict(f"adapter '{name}': job {busy[0].id} is {busy[0].state} on it; stop it first")
    return remove(store.adapters, name)
