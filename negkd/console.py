"""Console output: logs and progress on stderr, result tables on stdout.

``progress()`` gives a rich progress bar on a terminal and periodic one-line log records
otherwise (CI logs, ``> file``), so long jobs are never silent.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.text import Text

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def log(msg: str) -> None:
    err.print(msg, markup=False, soft_wrap=True)


def warn(msg: str) -> None:
    err.print(Text.assemble(("warning: ", "yellow"), msg), soft_wrap=True)


class _LogProgress:
    """Progress for a non-terminal: one log line at most every ``every`` seconds."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self.tasks: dict[int, dict] = {}

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        tid = len(self.tasks)
        self.tasks[tid] = {"desc": description, "total": total, "done": 0.0,
                           "t0": time.time(), "last": 0.0, "fields": fields}
        return tid

    def update(self, tid: int, advance: float = 0, completed: float | None = None,
               total: float | None = None, description: str | None = None, **fields) -> None:
        t = self.tasks[tid]
        if completed is not None:
            t["done"] = completed
        t["done"] += advance
        if total is not None:
            t["total"] = total
        if description is not None:
            t["desc"] = description
        t["fields"].update(fields)
        now = time.time()
        if now - t["last"] >= self.every or (t["total"] and t["done"] >= t["total"]):
            t["last"] = now
            self._emit(t, now)

    def advance(self, tid: int, advance: float = 1) -> None:
        self.update(tid, advance=advance)

    def _emit(self, t: dict, now: float) -> None:
        el = now - t["t0"]
        rate = t["done"] / el if el > 0 else 0.0
        total = t["total"]
        extra = " ".join(f"{k}={v}" for k, v in t["fields"].items())
        if total:
            eta = f" eta {(total - t['done']) / rate:.0f}s" if rate > 0 else ""
            log(f"{t['desc']}: {t['done']:.0f}/{total:.0f} ({100 * t['done'] / total:.0f}%) "
                f"{rate:.2f}/s{eta} {extra}".rstrip())
        else:
            log(f"{t['desc']}: {t['done']:.0f} {rate:.2f}/s {extra}".rstrip())

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def is_terminal() -> bool:
    return err.is_terminal and os.environ.get("NEGKD_PLAIN_PROGRESS") != "1"


@contextmanager
def progress(*extra_columns, every: float = 10.0, disable: bool = False):
    """Yield an object with ``add_task``/``update``/``advance`` (rich's Progress API subset)."""
    if disable:
        p = _LogProgress(every=float("inf"))
        yield p
        return
    if not is_terminal():
        yield _LogProgress(every=every)
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TimeElapsedColumn(), TimeRemainingColumn(), *extra_columns]
    with Progress(*cols, console=err, transient=False) as p:
        yield p


def debug_enabled() -> bool:
    return os.environ.get("NEGKD_DEBUG", "") not in ("", "0")


def fail(msg: str, code: int = 1) -> "None":
    err.print(Text.assemble(("error: ", "red"), msg), soft_wrap=True)
    sys.exit(code)
