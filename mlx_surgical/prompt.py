"""Prompts: write each example the way the model will be asked (the tokenizer's chat
template, or CodeLlama/Llama-2's [INST] form), tokenize it, and mark where the learned answer
starts. Generation uses the same PromptFormat, so an adapter is always asked as it learned."""

from dataclasses import dataclass
from typing import Optional

import jinja2
import numpy as np

from .config import DataConfig
from .console import counted
from .data import Record, raise_problems, to_messages
from .errors import UserError


class PromptFormat:
    """Writes prompts the same way for training and for generation, so an adapter is always
    asked questions in the form it learned."""

    def __init__(self, tokenizer, style: str = "auto", system_prompt: Optional[str] = None):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if style == "chat_template" and not has_template:
            raise UserError("data.prompt_format: the tokenizer has no chat template; use 'llama2' or 'auto'")
        self.style = "chat_template" if style == "chat_template" or (style == "auto" and has_template) else "llama2"
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    @classmethod
    def for_data(cls, tokenizer, data: DataConfig) -> "PromptFormat":
        """The format a run's data section asks for: how it trains, and so how it is asked."""
        return cls(tokenizer, data.prompt_format, data.system_prompt)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of everything before the answer, ending where the model starts writing."""
        messages = self._with_system(messages)
        if self.style == "chat_template":
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self._encode(text)
        # CodeLlama-Instruct / Llama-2: <s>[INST] <<SYS>>..<</SYS>> user [/INST] answer </s><s>[INST] ...
        ids, system = [], ""
        for m in messages:
            if m["role"] == "system":
                system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
            elif m["role"] == "user":
                ids += [self.tokenizer.bos_token_id] + self._encode(f"[INST] {system}{m['content'].strip()} [/INST]")
                system = ""
            else:
                ids += self._encode(m["content"].strip()) + [self.tokenizer.eos_token_id]
        return ids

    def example_ids(self, messages: list[dict], has_answer: bool) -> tuple[list[int], int]:
        """(token ids, prompt length): the loss covers ids[prompt length:]."""
        if not has_answer:
            ids = [self.tokenizer.bos_token_id] + self._encode(messages[0]["content"]) + [self.tokenizer.eos_token_id]
            return ids, 1
        prompt = self.prompt_ids(messages[:-1])
        answer = messages[-1]["content"]
        if self.style == "llama2":
            answer = answer.strip()
        return prompt + self._encode(answer) + [self.tokenizer.eos_token_id], len(prompt)


@dataclass
class Sample:
    ids: np.ndarray  # int32 token ids
    loss_start: int  # first position whose token is learned
    origin: str


@dataclass
class EncodedData:
    samples: list[Sample]
    truncated: list[str]
    skipped: list[str]

    def report_lines(self, split: str) -> list[str]:
        lines = []
        if self.truncated:
            whose = "its response" if len(self.truncated) == 1 else "their responses"
            lines.append(f"{split}: {counted(len(self.truncated), 'example')} longer than max_seq_length had {whose} "
                         f"cut: {', '.join(self.truncated[:5])}{' ...' if len(self.truncated) > 5 else ''}")
        if self.skipped:
            lines.append(f"{split}: {counted(len(self.skipped), 'example')} left out because their prompt fills "
                         f"max_seq_length or overlength is 'skip': {', '.join(self.skipped[:5])}"
                         f"{' ...' if len(self.skipped) > 5 else ''}")
        return lines

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.samples)


def encode_records(records: list[Record], fmt: PromptFormat, max_seq_length: int,
                   overlength: str, mask_prompt: bool) -> EncodedData:
    samples, truncated, skipped, problems = [], [], [], []
    for record in records:
        messages, has_answer = to_messages(record)
        try:
            ids, loss_start = fmt.example_ids(messages, has_answer)
        except jinja2.TemplateError as e:  # e.g. CodeLlama's template insists on user/assistant turns in turn
            problems.append(f"{record.origin}: the model's chat template refuses these messages ({e}); "
                            "reorder or merge them as it asks")
            continue
        if not mask_prompt:
            loss_start = 1
        if len(ids) > max_seq_length:
            if overlength == "error":
                problems.append(f"{record.origin}: example is {len(ids)} tokens, longer than training.max_seq_length "
                                f"({max_seq_length}); raise max_seq_length or set data.overlength to truncate or skip")
                continue
            # A response cut to nothing would train the model to answer with nothing.
            if overlength == "skip" or loss_start >= max_seq_length - 1:
                skipped.append(record.origin)
                continue
            ids = ids[:max_seq_length]
            truncated.append(record.origin)
        samples.append(Sample(np.asarray(ids, np.int32), loss_start, record.origin))
    raise_problems(problems)
    return EncodedData(samples, truncated, skipped)
