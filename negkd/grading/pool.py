"""math-verify in worker processes: its ``signal.alarm`` timeouts need a process's main thread,
and a worker stuck in C code is killed by a hard deadline (its pair counts as not equal)."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from negkd.grading.mathverify import _mv_parse, _quiet_math_verify

HARD_TIMEOUT = 20.0  # seconds a worker may go without finishing a pair before it is killed
SMALL_BATCH = 8  # fewer undecided pairs than this are graded in-process (main thread only)

Progress = Callable[[int, int], None]  # (done, total) of the math-verify stage


def _check(pred: str, gold: str) -> bool:
    """``mv_equivalent``, looked up on the package at call time (so a test can patch it there)."""
    import negkd.grading

    return negkd.grading.mv_equivalent(pred, gold)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def _worker(conn) -> None:  # pragma: no cover - runs in a child process
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    _quiet_math_verify()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        for i, (p, g) in msg:
            try:
                ok = _check(p, g)
            except BaseException:
                ok = False
            conn.send((i, ok))
        conn.send(None)  # chunk done


_PRELOAD = "negkd.grading._preload"  # what the forkserver imports before it forks any worker
_started = False  # prestart() ran: a warm forkserver exists, so even small batches go to workers


def _context(method: str | None = None):
    """Workers fork from a forkserver that has math-verify loaded (Linux); else they are spawned.

    Forking the main process instead would copy whatever it holds (threads included) and make
    it import math-verify first, on the critical path; the forkserver imports it in parallel."""
    import multiprocessing as mp

    if method is None:
        linux = sys.platform.startswith("linux")
        method = "forkserver" if linux and "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([_PRELOAD])
    return ctx


def prestart() -> None:
    """Start the workers' forkserver now, without waiting for it: it imports math-verify (~0.6 s)
    while the caller goes on (the fast path). A no-op where workers are spawned."""
    global _started
    if _started or _context().get_start_method() != "forkserver":
        return
    import atexit
    from multiprocessing import forkserver

    forkserver.ensure_running()
    _started = True
    stop = getattr(forkserver._forkserver, "_stop", None)
    if stop is not None:  # wait for the server at exit: its workers' CPU time is then ours (rusage)
        atexit.register(stop)


def _pool(
    pairs: Sequence[tuple[str, str]],
    workers: int | None = None,
    progress: Progress | None = None,
    chunk: int = 16,
    hard_timeout: float = HARD_TIMEOUT,
    stats: dict | None = None,
    ctx=None,
) -> list[bool]:
    """math-verify over ``pairs`` in worker processes; in-process for a small batch on the main
    thread unless the pool was prestarted. A worker that finishes no pair for ``hard_timeout`` s
    is killed (its pair: False). ``ctx``: a multiprocessing context (default ``_context()``)."""
    n = len(pairs)
    workers = max(1, min(workers or default_workers(), n))
    if _main_thread() and not _started and (workers == 1 and n <= SMALL_BATCH * 4 or n < SMALL_BATCH):
        if stats is not None:
            stats["workers"] = 0  # in-process
        out = []
        for i, (p, g) in enumerate(pairs):
            out.append(_check(p, g))
            if progress is not None:
                progress(i + 1, n)
        return out
    from multiprocessing.connection import wait

    ctx = ctx or _context()
    if ctx.get_start_method() == "fork" and _main_thread():
        _quiet_math_verify()
        _mv_parse("1")  # load math-verify and build its LaTeX parser once here: forked workers share it
    elif ctx.get_start_method() == "forkserver":
        prestart()
    # group pairs by gold so each worker's parse cache hits; chunk for few messages
    chunk = max(1, min(chunk, n // (workers * 4)))  # small batches: keep every worker busy
    order = sorted(range(n), key=lambda i: (pairs[i][1], pairs[i][0]))
    todo = deque(order[i : i + chunk] for i in range(0, n, chunk))
    results: list[bool | None] = [None] * n
    slots: list[dict] = []
    done = 0

    def spawn() -> dict:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "job": [], "busy": False, "last": time.monotonic()}

    def kill(slot: dict) -> None:
        slot["proc"].kill()
        slot["proc"].join(5)
        slot["conn"].close()

    try:
        t0 = time.perf_counter()
        slots = [spawn() for _ in range(workers)]  # waits for the forkserver to be ready
        if stats is not None:
            stats["pool_start_s"] = round(time.perf_counter() - t0, 3)
        while todo or any(s["busy"] for s in slots):
            for k, s in enumerate(slots):
                if not s["busy"] and todo:
                    if not s["proc"].is_alive():
                        kill(s)
                        s = slots[k] = spawn()
                    job = todo.popleft()
                    s["job"], s["busy"], s["last"] = list(job), True, time.monotonic()
                    s["conn"].send([(i, pairs[i]) for i in job])
            busy = [s for s in slots if s["busy"]]
            for conn in wait([s["conn"] for s in busy], timeout=1.0):
                s = next(x for x in busy if x["conn"] is conn)
                try:
                    while s["busy"] and conn.poll():
                        msg = conn.recv()
                        if msg is None:  # the chunk is done
                            s["busy"] = False
                            break
                        i, ok = msg
                        results[i] = ok
                        s["job"].remove(i)
                        s["last"] = time.monotonic()
                        done += 1
                        if progress is not None:
                            progress(done, n)
                except (EOFError, OSError):
                    s["last"] = -math.inf  # the worker died: handled below like a hang
            now = time.monotonic()
            for k, s in enumerate(slots):
                if s["busy"] and (now - s["last"] > hard_timeout or not s["proc"].is_alive()):
                    # it works through its chunk in order: the first unanswered pair is the culprit
                    if s["job"]:
                        culprit, rest = s["job"][0], s["job"][1:]
                        results[culprit] = False
                        if stats is not None:
                            stats["killed"] = stats.get("killed", 0) + 1
                        done += 1
                        if progress is not None:
                            progress(done, n)
                        if rest:
                            todo.appendleft(rest)
                    kill(s)
                    slots[k] = spawn()
    finally:
        for s in slots:
            try:
                s["conn"].send(None)
            except (OSError, ValueError):
                pass
        for s in slots:
            s["proc"].join(1)
            if s["proc"].is_alive():
                s["proc"].kill()
                s["proc"].join(1)
    return [bool(r) for r in results]
