"""What every vlmedge CLI shares: the typer app settings, the one-line error
contract and progress output that stays off stdout (stdout is for answers
and --json)."""
from __future__ import annotations

import time
from contextlib import contextmanager

import typer

from vlmedge.errors import UserInputError


def make_app(help: str) -> typer.Typer:
    # pretty_exceptions off: a bug should print a plain traceback, a user error
    # one line (see vlmedge.errors.cli_errors).
    return typer.Typer(help=help, add_completion=False, no_args_is_help=False,
                       pretty_exceptions_enable=False,
                       context_settings={"help_option_names": ["-h", "--help"]})


def positive(name: str, value: int | float) -> None:
    if value is None or value <= 0:
        raise UserInputError(f"{name} must be positive", expected="a number > 0",
                             got=str(value))


class Progress:
    """A rich progress bar on stderr with ETA; silent when `quiet`."""

    def __init__(self, description: str, total: int, quiet: bool = False):
        self.quiet = quiet
        if quiet:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as _P, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        self._p = _P(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                     console=Console(stderr=True), transient=True)
        self._task = self._p.add_task(description, total=total)

    def __enter__(self):
        if not self.quiet:
            self._p.__enter__()
        return self

    def update(self, done: int, total: int | None = None) -> None:
        if not self.quiet:
            self._p.update(self._task, completed=done, total=total)

    def __exit__(self, *exc):
        if not self.quiet:
            self._p.__exit__(*exc)


@contextmanager
def stage(name: str, log, times: dict[str, float] | None = None):
    """Logs `[name] ...` and `[name] done in 1.2s` around a block of work
    (through `log`, e.g. a print to stderr) and records the seconds in `times`."""
    start = time.perf_counter()
    log(f"[{name}] ...")
    yield
    took = round(time.perf_counter() - start, 2)
    if times is not None:
        times[name] = took
    log(f"[{name}] done in {took:.1f}s")
