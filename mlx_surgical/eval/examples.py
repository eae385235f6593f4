"""Held-out examples as the evaluation reads them: their concepts, their tests, and the program
that runs a generated answer against those tests.

Tests come in two shapes. HumanEval's: `test` is code defining `check(candidate)` and
`entry_point` names the function to pass to it. Or `tests`: a list of assert lines run after
the answer's code. Concepts come from `concept` (a string) or `tags` (a list of strings).
"""

import re
import textwrap
from dataclasses import dataclass, field
from typing import Optional

from ..data import Record, check_records, raise_problems, to_messages
from ..errors import UserError

FENCED = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)


@dataclass
class Tests:
    code: str  # HumanEval's `test` code, or the assert lines joined
    entry_point: Optional[str]  # set for HumanEval-style tests: the code ends with check(entry_point)

    def program(self, candidate: str) -> str:
        """The candidate's code followed by its tests, as one file to run."""
        call = f"\n\ncheck({self.entry_point})\n" if self.entry_point else "\n"
        return f"{candidate}\n\n\n{self.code}{call}"


@dataclass
class EvalExample:
    origin: str
    messages: list[dict]  # the conversation, ending with the answer when has_answer
    has_answer: bool
    concepts: list[str] = field(default_factory=list)
    tests: Optional[Tests] = None

    @property
    def prompt_messages(self) -> list[dict]:
        return self.messages[:-1] if self.has_answer else []


def _python_problem(code: str, origin: str, where: str) -> Optional[str]:
    try:
        compile(code, f"{origin} {where}", "exec")
    except SyntaxError as e:
        return f"{origin}: {where} is not valid Python (line {e.lineno}: {e.msg}); fix the test code"
    except ValueError as e:  # null bytes
        return f"{origin}: {where} is not valid Python ({e}); fix the test code"
    return None


def _tests(fields: dict, origin: str, problems: list[str]) -> Optional[Tests]:
    test, entry_point, lines = fields.get("test"), fields.get("entry_point"), fields.get("tests")
    if test is None and entry_point is None and lines is None:
        return None
    if lines is not None:
        if test is not None or entry_point is not None:
            extra = " and ".join(f"'{k}'" for k in ("test", "entry_point") if k in fields)
            problems.append(f"{origin}: 'tests' (assert lines) is given, so drop {extra}: those belong to "
                            "HumanEval-style tests ('test' defining check(candidate) + 'entry_point')")
            return None
        if not isinstance(lines, list) or not lines or not all(isinstance(t, str) and t.strip() for t in lines):
            problems.append(f"{origin}: field 'tests' must be a non-empty list of assert lines (strings)")
            return None
        found = [p for i, t in enumerate(lines) if (p := _python_problem(t, origin, f"tests[{i}]"))]
        problems += found
        return None if found else Tests("\n".join(lines), None)
    if not isinstance(test, str) or not test.strip():
        problems.append(f"{origin}: field 'test' must be Python code defining check(candidate) (HumanEval style)")
        return None
    if not isinstance(entry_point, str) or not entry_point.isidentifier():
        problems.append(f"{origin}: field 'entry_point' must name the function the tests call, "
                        "as 'test' (HumanEval style) passes it to check()")
        return None
    problem = _python_problem(test, origin, "field 'test'")
    if problem:
        problems.append(problem)
        return None
    if not re.search(r"^def check\(", test, re.M):
        problems.append(f"{origin}: field 'test' defines no check(candidate) function; HumanEval-style tests "
                        f"are called as check({entry_point})")
        return None
    return Tests(test, entry_point)


def _concepts(fields: dict, origin: str, problems: list[str]) -> list[str]:
    concept, tags = fields.get("concept"), fields.get("tags")
    found = []
    if concept is not None:
        if not isinstance(concept, str) or not concept.strip():
            problems.append(f"{origin}: field 'concept' must be a non-empty string")
        else:
            found.append(concept.strip())
    if tags is not None:
        if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
            problems.append(f"{origin}: field 'tags' must be a list of non-empty strings")
        else:
            found += [t.strip() for t in tags if t.strip() not in found]
    return found


def read_examples(records: list[Record], samples: Optional[int]) -> list[EvalExample]:
    """Check every record at once, by the rules of training data and for its tests and
    concepts. With an explicit `samples` of 1 or more every example must carry tests, since the
    user asked for each one to be run."""
    examples, problems = [], []
    try:
        if records:
            check_records(records, "held-out data")
    except UserError as e:
        problems += e.problems
    for record in records:
        try:
            messages, has_answer = to_messages(record)
        except UserError:  # reported by check_records
            continue
        tests = _tests(record.fields, record.origin, problems)
        if tests is not None and not has_answer:
            problems.append(f"{record.origin}: a plain 'text' example has no prompt to answer; give its tests "
                            "an instruction/response, prompt/completion or messages example")
        elif tests is None and samples and not any(k in record.fields for k in ("test", "entry_point", "tests")):
            problems.append(f"{record.origin}: no tests to run, but samples is {samples}; add 'test' + "
                            "'entry_point' or 'tests' to this example, or leave samples unset")
        examples.append(EvalExample(record.origin, messages, has_answer, _concepts(record.fields, record.origin,
                                                                                   problems), tests))
    raise_problems(problems)
    return examples


def extract_code(answer: str, example: EvalExample) -> str:
    """The code in a generated answer: the fenced block that defines the entry point (else the
    first fenced block, else the whole answer). An answer that continues a prompt of code, as
    HumanEval prompts are written, gets that prompt in front of it."""
    blocks = [body for lang, body in FENCED.findall(answer) if lang.lower() in ("", "python", "py", "python3")]
    entry = example.tests.entry_point if example.tests else None
    defines = (lambda code: re.search(rf"^\s*def {entry}\(", code, re.M)) if entry else (lambda code: True)
    code = next((b for b in blocks if defines(b)), blocks[0] if blocks else answer)
    prompt = example.prompt_messages[-1]["content"] if example.prompt_messages else ""
    if entry and not defines(code) and defines(prompt):
        return _continuing(prompt, code)
    return textwrap.dedent(code)  # a whole answer that starts indented is still a program


def _continuing(prompt: str, code: str) -> str:
    """The prompt's code followed by the answer's. A chat template that trims messages (Llama 2's
    and CodeLlama-Instruct's do) trains and generates the body's first line without its
    indentation: a flush-left first line takes the indentation of the prompt's last line."""
    last = next((line for line in reversed(prompt.splitlines()) if line.strip()), "")
    indent = last[:len(last) - len(last.lstrip())]
    lines = code.split("\n")
    if indent and not lines[0][:1].isspace():
        rest = [line for line in lines[1:] if line.strip()]
        # Only the first line lost its indentation, or (no line indented) all of them did.
        lines = [indent + lines[0], *lines[1:]] if all(line.startswith(indent) for line in rest) else \
            [indent + line if line.strip() else line for line in lines]
    code = "\n".join(lines)
    return f"{prompt}{code}" if prompt.endswith("\n") else f"{prompt}\n{code}"
