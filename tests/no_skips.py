"""A pytest plugin: with MLX_SURGICAL_TESTS_NO_SKIPS=1 (as .ci/run sets) a run in which any test
or test module skipped fails, naming each skip's reason. CI installs everything the skips wait
for (llama.cpp, SmolLM2, Chromium, PyTorch, namespaces for the sandbox), so a build or download
that failed there shows as a failure, not as a quieter run; every other test still runs."""

import os

import pytest

ENV = "MLX_SURGICAL_TESTS_NO_SKIPS"
skipped: list[str] = []


def _note(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        skipped.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _note(report)


def pytest_collectreport(report):
    _note(report)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get(ENV) == "1" and skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if os.environ.get(ENV) == "1" and skipped:
        terminalreporter.section(f"{ENV}=1: these would have been skipped, so the run fails", red=True)
        for line in skipped:
            terminalreporter.line(line)
