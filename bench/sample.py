"""Benchmark: `negkd sample`'s client against a loopback server with fixed latency per request.

    .venv/bin/python bench/sample.py                 # 600 requests, 1 s each, --concurrency 64
    .venv/bin/python bench/sample.py --latency 0.3   # the in-process figure at 300 ms
    .venv/bin/python bench/sample.py --full-baseline # also time all 600 requests sequentially (10 min)

The fake server (tests/fake_openai.py) runs in its own process, so its CPU is not the client's.
Rows (all measured in this one run):

- sequential: one request at a time through the same client (the baseline). Unless
  --full-baseline, it times --baseline-requests requests and scales to the full count;
- client: negkd.client.run_jobs with 64 in flight (the library path `infer --backend openai` uses),
  with the default transport (POSTs through the openai client's pool, headers built once) and with
  transport="openai" (every request through ``AsyncOpenAI.post``), to show what the client costs;
- negkd sample: the whole command in a subprocess (75 problems x 8 samples = 600 requests),
  including the appends to samples.jsonl and progress; its wall and CPU time are the request
  phase's, from the manifest (`this_run.requests_wall_s`, `requests_cpu_s`); the whole process's
  are printed below the table;
- CLI, start-up included: the same two subprocesses timed from outside, whole process: `negkd sample`
  (interpreter start-up, imports, reading, requests, writing) against a plain httpx2 loop in its own
  process (``AsyncClient`` + a semaphore of --concurrency, the same request body; no retries, no
  output) — the figure a user sees at the command line, beside the in-process ones.

Each row gives wall time, the ratio to the ideal ``requests * latency / concurrency`` (target: within
1.3x), and the client's CPU time per request. Note the floor: with equal latencies requests move in
waves, so ``ceil(600 / 64) = 10`` waves of 1 s = 10 s, already 1.07x the ideal 9.375 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fake_openai import spawn_server  # noqa: E402

from negkd.client import Job, SamplingParams, Teacher, run_jobs  # noqa: E402

MESSAGES = [{"role": "system", "content": "Solve step by step; box the answer."},
            {"role": "user", "content": "Problem:\nWhat is $3 + 4 \\cdot 5$?"}]


async def _client_run(url: str, requests: int, concurrency: int, transport: str = "pool") -> tuple[float, float, int]:
    params = SamplingParams(temperature=0.5, top_p=1.0, max_tokens=512)
    async with Teacher(url, "bench", concurrency=concurrency, timeout=30, max_retries=2, transport=transport) as t:
        await t.complete(MESSAGES, params)  # connect + warm the pool's first connection
        done = 0

        def on_result(job, res):
            nonlocal done
            done += len(res.choices)

        jobs = (Job(MESSAGES, seed=i) for i in range(requests))
        c0, t0 = time.process_time(), time.perf_counter()
        await run_jobs(t, jobs, params, on_result)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert done == requests and t.stats.retries == 0, t.stats
    return wall, cpu, done


def _cli_run(url: str, problems: int, n: int, concurrency: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as d:
        probs = Path(d) / "problems.jsonl"
        with open(probs, "w") as fh:
            for i in range(problems):
                fh.write(json.dumps({"id": f"b{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n")
        out = Path(d) / "run"
        cmd = [sys.executable, "-m", "negkd", "sample", str(probs), "-o", str(out), "--base-url", url,
               "--model", "bench", "--n", str(n), "--concurrency", str(concurrency), "--timeout", "30"]
        env = {**os.environ, "NEGKD_PLAIN_PROGRESS": "1", "OPENAI_API_KEY": "bench"}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        total = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode != 0:
            raise SystemExit(f"negkd sample failed:\n{r.stderr[-3000:]}")
        man = json.loads((out / "manifest.json").read_text())
        assert man["samples"] == problems * n, man
        proc_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return man["this_run"]["requests_wall_s"], total, man["this_run"]["requests_cpu_s"], proc_cpu


def _httpx_loop(url: str, requests: int, concurrency: int) -> None:
    """The plain-loop row, run in its own process: what a user would write without negkd."""
    import httpx2

    async def go() -> int:
        sem = asyncio.Semaphore(concurrency)
        body = {"model": "bench", "messages": MESSAGES, "temperature": 0.5, "top_p": 1.0, "max_tokens": 512}
        limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx2.AsyncClient(base_url=url, timeout=30, limits=limits,
                                      headers={"Authorization": "Bearer bench"}) as http:
            async def one(i: int) -> int:
                async with sem:
                    r = await http.post("/chat/completions", json={**body, "seed": i})
                    r.raise_for_status()
                    return len(r.json()["choices"])

            return sum(await asyncio.gather(*(one(i) for i in range(requests))))

    assert asyncio.run(go()) == requests


def _timed_subprocess(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{r.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--latency", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--baseline-requests", type=int, default=8,
                    help="sequential requests actually timed (scaled to --requests)")
    ap.add_argument("--full-baseline", action="store_true", help="time all --requests sequentially")
    ap.add_argument("--no-cli", action="store_true", help="skip the `negkd sample` subprocess row")
    ap.add_argument("--httpx-loop", nargs=3, metavar=("URL", "N", "C"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.httpx_loop:
        return _httpx_loop(a.httpx_loop[0], int(a.httpx_loop[1]), int(a.httpx_loop[2]))

    ideal = a.requests * a.latency / a.concurrency
    rows = []
    with spawn_server(latency=a.latency) as srv:
        seq_n = a.requests if a.full_baseline else min(a.baseline_requests, a.requests)
        w, cpu, _ = asyncio.run(_client_run(srv.url, seq_n, 1))
        scale = a.requests / seq_n
        label = "sequential (concurrency 1)" + ("" if seq_n == a.requests else f", {seq_n} timed x{scale:g}")
        rows.append((label, w * scale, cpu / seq_n))
        w, cpu, _ = asyncio.run(_client_run(srv.url, a.requests, a.concurrency))
        rows.append((f"negkd.client run_jobs (concurrency {a.concurrency})", w, cpu / a.requests))
        w, cpu, _ = asyncio.run(_client_run(srv.url, a.requests, a.concurrency, "openai"))
        rows.append(("  same, transport=openai (AsyncOpenAI.post)", w, cpu / a.requests))
        if not a.no_cli:
            n = 8
            problems = a.requests // n
            req_wall, cli_total, cpu, proc_cpu = _cli_run(srv.url, problems, n, a.concurrency)
            rows.append((f"negkd sample CLI ({problems} problems x {n})", req_wall, cpu / (problems * n)))
            rows.append(("  same, whole process (start-up included)", cli_total, proc_cpu / (problems * n)))
            wall, hcpu = _timed_subprocess([sys.executable, str(Path(__file__).resolve()), "--httpx-loop", srv.url,
                                            str(problems * n), str(a.concurrency)])
            rows.append(("plain httpx2 loop, whole process (start-up included)", wall, hcpu / (problems * n)))

    print(f"{a.requests} requests, {a.latency * 1000:.0f} ms latency each, server in its own process; "
          f"ideal at concurrency {a.concurrency} = {a.requests} x {a.latency} / {a.concurrency} = {ideal:.3f} s")
    print(f"{'':52s} {'wall s':>8s} {'x ideal':>8s} {'speedup':>8s} {'CPU ms/req':>11s}")
    base = rows[0][1]
    for label, wall, cpu in rows:
        print(f"{label:52s} {wall:8.2f} {wall / ideal:8.2f} {base / wall:8.1f} {cpu * 1000:11.2f}")
    if not a.no_cli:
        print(f"(negkd sample CLI: wall and CPU of the request phase; the whole process took {cli_total:.2f} s "
              f"wall and {proc_cpu:.2f} s CPU with start-up, imports and the final sort)")
    for label, wall, _ in rows[1:]:
        if "transport=openai" in label or "httpx2" in label:
            continue
        print(f"target within 1.3x of ideal, {label.strip()}: {'MET' if wall <= 1.3 * ideal else 'MISSED'} "
              f"({wall / ideal:.2f}x)")


if __name__ == "__main__":
    main()
