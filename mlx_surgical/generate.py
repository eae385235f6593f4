"""Generate with a base model, with or without an adapter, prompting exactly as training did."""

from pathlib import Path
from typing import Callable, Iterator, Optional

from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from .adapter import AdapterConfig
from .errors import UserError, decode_user_text, not_text
from .model import LoadedModel
from .prompt import PromptFormat
from .rundir import require_directory
from .surgery import base_only, load_with_adapter


def generate(model_path: Optional[str], adapter_dir: Optional[str], read_prompt: Callable[[], str | bytes],
             max_tokens: int, compare: bool = False) -> Iterator[str]:
    """What `mlx-surgical generate` prints, piece by piece: the answer streamed, or with `compare`
    the base model's and the adapted model's in turn. The prompt (bytes when read from stdin) is
    read after the checks, so no one types a prompt only to be told the command was wrong."""
    if compare and adapter_dir is None:
        raise UserError("generate --compare needs --adapter")
    base_model = base_model_for(model_path, adapter_dir)
    prompt = read_prompt()
    if isinstance(prompt, bytes):
        prompt = decode_user_text(prompt, "generate: the prompt on stdin")
    if not prompt.strip():
        raise UserError("generate: give a PROMPT argument or text on stdin")
    if problem := not_text("generate: the prompt", prompt):
        raise UserError(problem)
    loaded = load_with_adapter(base_model, adapter_dir, progress=True, where="--model")
    if compare:
        base, adapted = compare_answers(loaded, adapter_dir, prompt, max_tokens)
        return iter([f"=== base ===\n{base}\n=== adapted ===\n{adapted}"])
    return stream_answer(loaded, prompt_format_for(loaded, adapter_dir), prompt, max_tokens)


def base_model_for(model_path: Optional[str], adapter_dir: Optional[str | Path]) -> str:
    """The base model to load: --model when given, else the one the adapter was trained on."""
    if model_path:
        return model_path
    if adapter_dir is not None and (base := AdapterConfig.read(require_directory(adapter_dir)).local_base_model):
        return base
    raise UserError("--model: name the base model (the adapter does not record the one it was trained on)"
                    if adapter_dir is not None else "--model: name the base model to generate with")


def prompt_format_for(loaded: LoadedModel, adapter_dir: Optional[str | Path] = None) -> PromptFormat:
    """The adapter's training prompt format when it recorded one, else the model's default."""
    style, system = "auto", None
    if adapter_dir is not None:
        recorded = AdapterConfig.read(adapter_dir).prompt
        style, system = recorded.format, recorded.system_prompt
    return PromptFormat(loaded.tokenizer, style, system)


def stream_completion(loaded: LoadedModel, prompt_ids: list[int], max_tokens: int,
                      temperature: float = 0.0) -> Iterator[str]:
    """The model's continuation of prompt_ids, piece by piece: greedy at temperature 0, else
    sampled (from MLX's global random state)."""
    for response in stream_generate(loaded.model, loaded.tokenizer, prompt_ids, max_tokens=max_tokens,
                                    sampler=make_sampler(temp=temperature)):
        yield response.text


def stream_answer(loaded: LoadedModel, fmt: PromptFormat, instruction: str, max_tokens: int) -> Iterator[str]:
    """Greedy decoding of the answer to one instruction, yielded piece by piece."""
    yield from stream_completion(loaded, fmt.prompt_ids([{"role": "user", "content": instruction}]), max_tokens)


def complete(loaded: LoadedModel, fmt: PromptFormat, messages: list[dict], max_tokens: int,
             temperature: float = 0.0) -> str:
    """The whole answer to a conversation without trailing space or leading blank lines: greedy at
    temperature 0, else sampled. The first line keeps its indentation: an answer that continues a
    prompt's code (HumanEval's completions) starts inside the function body."""
    return "".join(stream_completion(loaded, fmt.prompt_ids(messages), max_tokens, temperature)).rstrip().lstrip("\n")


def answer(loaded: LoadedModel, fmt: PromptFormat, instruction: str, max_tokens: int) -> str:
    return complete(loaded, fmt, [{"role": "user", "content": instruction}], max_tokens)


def compare_answers(loaded: LoadedModel, adapter_dir: str | Path, instruction: str,
                    max_tokens: int) -> tuple[str, str]:
    """(base answer, adapted answer) to one instruction, from a model with the adapter attached."""
    with base_only(loaded.model):
        base = answer(loaded, prompt_format_for(loaded), instruction, max_tokens)
    return base, answer(loaded, prompt_format_for(loaded, adapter_dir), instruction, max_tokens)
