"""Whether the generated code works: candidates per problem, each run with its tests in the
sandbox, counted for pass@k."""

from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from ..generate import complete
from ..model import LoadedModel
from ..prompt import PromptFormat
from .examples import EvalExample, extract_code
from .sandbox import Sandbox


@dataclass
class ProblemResult:
    origin: str
    concepts: list[str]
    statuses: list[str] = field(default_factory=list)  # one per candidate: passed | failed | timeout | killed
    first_failure: Optional[str] = None  # the end of the first failing candidate's output

    @property
    def samples(self) -> int:
        return len(self.statuses)

    @property
    def passed(self) -> int:
        return self.statuses.count("passed")

    def to_dict(self) -> dict:
        return {"origin": self.origin, "concepts": self.concepts, "samples": self.samples, "passed": self.passed,
                "statuses": self.statuses, "first_failure": self.first_failure}


def run_problems(loaded: LoadedModel, fmt: PromptFormat, problems: list[EvalExample], samples: int,
                 temperature: float, max_tokens: int, seed: int, sandbox: Sandbox) -> list[ProblemResult]:
    """`samples` candidates per problem (greedy when 1), each run with the problem's tests."""
    mx.random.seed(seed)  # both sides of the comparison draw from the same random stream
    results = []
    for problem in problems:
        result = ProblemResult(problem.origin, problem.concepts)
        for _ in range(samples):
            answer = complete(loaded, fmt, problem.prompt_messages, max_tokens, temperature if samples > 1 else 0.0)
            outcome = sandbox.run(problem.tests.program(extract_code(answer, problem)))
            result.statuses.append(outcome.status)
            if not outcome.passed and result.first_failure is None:
                result.first_failure = outcome.output[-600:]
        results.append(result)
    return results
