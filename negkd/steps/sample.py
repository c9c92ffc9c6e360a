"""``negkd sample``: teacher rationales for every problem, from an OpenAI-compatible endpoint or a local model.

Reads problems, writes ``DIR/samples.jsonl`` (the *sample* contract: one line per ``(id, k)``,
``k = 0..n-1``), ``DIR/errors.jsonl`` (every ``(id, k)`` that failed for good, with the reason)
and ``DIR/manifest.json`` (written last).

Resumable by construction: each sample is appended and flushed the moment it arrives; a rerun
reads the file back (a torn last line left by a kill is cut away), requests only the missing
``(id, k)``, and, when all are in, sorts the file into problem order. A hidden
``DIR/.sample-run.json`` holds the arguments of an unfinished run so a rerun with different
sampling arguments is refused instead of mixing two distributions in one file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from negkd.console import log, warn
from negkd.errors import UsageError, UserError, choice
from negkd.io import RUNNING, RunDir, atomic_write_text, dumps, resolve_input
from negkd.schemas import FORMATS

SAMPLES = "samples.jsonl"
ERRORS = "errors.jsonl"
STATE = ".sample-run.json"
LOCK = ".sample.lock"
DUP_WARN = 0.20


class Backend(str, Enum):
    openai = "openai"
    hf = "hf"


class Api(str, Enum):
    chat = "chat"
    completions = "completions"


def command(
    problems: Annotated[Path, typer.Argument(
        help="Problem file (.jsonl/.jsonl.gz/.json in any format --format knows), or a directory "
             "holding problems.jsonl.", show_default=False, metavar="PROBLEMS")],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Output directory: samples.jsonl, errors.jsonl, manifest.json.",
        show_default=False)],
    model: Annotated[str, typer.Option(
        help="Teacher model: the served model name (--backend openai) or a local Hugging Face model "
             "directory (--backend hf).", show_default=False)],
    base_url: Annotated[Optional[str], typer.Option(
        help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or http://localhost:8000/v1 "
             "(vLLM). Required for --backend openai.", show_default=False)] = None,
    backend: Annotated[Backend, typer.Option(
        help="openai: any OpenAI-compatible HTTP endpoint; hf: a local model via transformers "
             "generate.")] = Backend.openai,
    api: Annotated[Api, typer.Option(
        help="chat: /chat/completions with the few-shot examples as turns (the server applies the "
             "model's chat template); completions: /completions with one plain-text few-shot "
             "prompt (base models).")] = Api.chat,
    prompt: Annotated[str, typer.Option(
        help="Teacher prompt: a built-in (math: MATH few-shot CoT ending in \\boxed{}; gsm8k: "
             "grade-school few-shot CoT; zero-shot), a JSON prompt file "
             "{instruction, examples:[{question, rationale}], template, stop}, or a text file / "
             "string containing {question}.")] = "math",
    fmt: Annotated[str, typer.Option(
        "--format", callback=choice(FORMATS), help=f"Problem file format: {', '.join(FORMATS)}.")] = "auto",
    n: Annotated[int, typer.Option(help="Samples per problem (k = 0..n-1).")] = 8,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (the paper used 0.5).")] = 0.5,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling probability mass.")] = 1.0,
    max_tokens: Annotated[int, typer.Option(
        help="Most tokens per rationale; rationales cut at this length are counted as truncated.")] = 1024,
    seed: Annotated[Optional[int], typer.Option(
        help="Base seed. Each request gets seed = hash(seed, problem id, k), recorded in the sample's "
             "meta, so reruns are reproducible where the server honours seeds. Omit with --no-seed. "
             "--backend hf: one seed per batched generate over problems needing the same number of "
             "samples (recorded in meta); a rerun of the same command reproduces them.")] = 0,
    no_seed: Annotated[bool, typer.Option(
        "--no-seed", help="Send no seed (for servers that reject the field).")] = False,
    n_per_request: Annotated[int, typer.Option(
        help="Ask for up to this many samples in one request via the API's n parameter. If the "
             "server rejects n or returns fewer choices, negkd falls back to one request per sample.")] = 1,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once (--backend openai).")] = 16,
    rpm: Annotated[Optional[float], typer.Option(
        help="Client-side limit: requests per minute (default: none).", show_default=False)] = None,
    tpm: Annotated[Optional[float], typer.Option(
        help="Client-side limit: tokens per minute, counting estimated prompt tokens + max_tokens * n "
             "per request, as OpenAI does (default: none).", show_default=False)] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before one request is abandoned and retried.")] = 120.0,
    max_retries: Annotated[int, typer.Option(
        help="Retries per request on timeouts, connection errors, 408/409/429/5xx and malformed "
             "responses; after that the samples go to errors.jsonl.")] = 6,
    backoff: Annotated[float, typer.Option(
        help="First retry delay in seconds; doubles per retry (with jitter, capped at 60s). A "
             "server's Retry-After is honoured instead.")] = 1.0,
    circuit_breaker: Annotated[float, typer.Option(
        help="Stop the run once every request for this many seconds failed to connect (the server is "
             "down or crashed) instead of retrying each one for minutes; what arrived is kept and a "
             "rerun resumes. 0 = off.")] = 10.0,
    api_key_env: Annotated[str, typer.Option(
        help="Environment variable holding the API key (never written to any file or log; unset is "
             "fine for local servers).")] = "OPENAI_API_KEY",
    stop: Annotated[Optional[list[str]], typer.Option(
        help="Stop sequence (repeatable). Default: the prompt's own (\\n\\nProblem: for few-shot "
             "completions prompts).", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Use only the first N problems of the file (applied before --shard).", show_default=False)] = None,
    shard: Annotated[Optional[str], typer.Option(
        help="K/N: take every N-th problem starting at the K-th (0-based), so N machines can each "
             "run one shard and the outputs be concatenated.", show_default=False)] = None,
    chat_template: Annotated[bool, typer.Option(
        help="--backend hf: wrap the prompt in the tokenizer's chat template (instruct models).")] = False,
    batch_size: Annotated[int, typer.Option(help="--backend hf: sequences per generate call.")] = 32,
    device: Annotated[str, typer.Option(help="--backend hf: auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="--backend hf: auto, float32, bfloat16 or float16.")] = "auto",
    price_in: Annotated[Optional[float], typer.Option(
        help="Price per million prompt tokens, for the cost line of the summary.", show_default=False)] = None,
    price_out: Annotated[Optional[float], typer.Option(
        help="Price per million completion tokens, for the cost line of the summary.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        help="Count the requests and prompt tokens still to send (and their cost with --price-*); "
             "send nothing, write nothing.")] = False,
    retry_failed: Annotated[bool, typer.Option(
        help="Re-attempt the samples listed in errors.jsonl (normally a rerun skips them).")] = False,
    overwrite: Annotated[bool, typer.Option(
        help="Discard DIR's samples and start again (needed to change sampling arguments).")] = False,
) -> None:
    """Sample N chain-of-thought rationales per problem from a teacher model.

    Writes DIR/samples.jsonl (one line per (id, k): the problem, k, rationale, and meta with the seed, finish_reason and usage), DIR/errors.jsonl (samples that failed for good, with the reason) and DIR/manifest.json.

    Interrupt it any time: rerunning the same command resumes where it stopped, and a finished run is a no-op. A 400/401/403/404 stops the run with a message (bad key, unknown model). After sampling, the duplicate rate (identical rationales for one problem) is reported; above 20% points to a broken seed or temperature.

    Example: negkd sample data/math_train.jsonl -o runs/teacher --base-url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct --n 8 --concurrency 64
    """
    _check_options(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, n_per_request=n_per_request,
                   concurrency=concurrency, rpm=rpm, tpm=tpm, timeout=timeout, max_retries=max_retries,
                   backoff=backoff, limit=limit, batch_size=batch_size, price_in=price_in, price_out=price_out)
    if circuit_breaker < 0:
        raise typer.BadParameter(f"must be >= 0 (0 = off), got {circuit_breaker}", param_hint="'--circuit-breaker'")
    if backend == Backend.openai:
        # option conflicts are usage errors (exit 2), like any other bad flag
        if not base_url:
            raise typer.BadParameter("--backend openai needs --base-url (e.g. http://localhost:8000/v1 for vLLM, "
                                     "https://api.openai.com/v1 for OpenAI); or sample a local model with "
                                     "--backend hf", param_hint="'--base-url'")
        if not base_url.startswith(("http://", "https://")):
            raise typer.BadParameter(f"{base_url!r}: expected an http:// or https:// URL", param_hint="'--base-url'")
        if chat_template:
            raise typer.BadParameter("applies to --backend hf; with --backend openai, --api chat uses the "
                                     "server's own chat template", param_hint="'--chat-template'")
    elif temperature <= 0:
        raise typer.BadParameter("--backend hf samples: --temperature must be > 0 (greedy decoding gives one "
                                 "answer, not n different rationales)", param_hint="'--temperature'")
    shard_k, shard_n = _parse_shard(shard)
    if no_seed:
        seed = None

    from negkd.fewshot import load_prompt

    tprompt = load_prompt(prompt)
    stops = list(stop) if stop else None
    if stops is not None and len(stops) > 4:
        raise UsageError(f"--stop given {len(stops)} times; OpenAI-compatible servers take at most 4 stop sequences")
    # stop sequences only matter for plain-text prompts (chat turns end by themselves)
    uses_text = (backend == Backend.openai and api == Api.completions) or (backend == Backend.hf and not chat_template)
    if stops is None:
        stops = list(tprompt.stop) if uses_text else []

    from negkd.schemas import read_problems

    path = resolve_input(problems, ["problems.jsonl", "problems.json"])
    probs = read_problems(path, fmt)
    if limit is not None:
        probs = probs[:limit]
    if shard_n > 1:
        probs = probs[shard_k::shard_n]
    if not probs:
        raise UserError(f"{path}: no problems left after --limit/--shard ({shard})")
    # render every prompt now: a template that needs a missing field fails before anything is written
    render = _renderer(tprompt, backend, api, chat_template)

    args: dict[str, Any] = dict(
        format=fmt, backend=backend.value, model=model, api=api.value if backend == Backend.openai else None,
        prompt=prompt, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
        n_per_request=n_per_request if backend == Backend.openai else 1, stop=stops, limit=limit,
        shard=f"{shard_k}/{shard_n}" if shard_n > 1 else None,
        chat_template=chat_template if backend == Backend.hf else None,
    )
    inputs = [path]
    if Path(prompt).is_file() and prompt not in _builtin_names():
        inputs.append(Path(prompt))

    tokenizer = None
    if backend == Backend.hf:
        from negkd.modeling import load_tokenizer

        tokenizer = load_tokenizer(model)
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{model}: --chat-template needs a tokenizer with a chat template (an instruct "
                            "model); drop --chat-template for base models")
    prompts = {p["id"]: render(p, tokenizer) for p in probs}

    out = Path(output)
    if dry_run:
        _dry_run(out, probs, prompts, n=n, n_per_request=args["n_per_request"], max_tokens=max_tokens,
                 tokenizer=tokenizer, price_in=price_in, price_out=price_out, retry_failed=retry_failed)
        return

    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another -o/--output")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        _run(out, args, inputs, probs, prompts, tprompt, tokenizer, backend=backend, base_url=base_url,
             api=api, n=n, seed=seed, n_per_request=args["n_per_request"], stops=stops,
             temperature=temperature, top_p=top_p, max_tokens=max_tokens, concurrency=concurrency, rpm=rpm,
             tpm=tpm, timeout=timeout, max_retries=max_retries, backoff=backoff, api_key_env=api_key_env,
             breaker_s=circuit_breaker, batch_size=batch_size, device=device, dtype=dtype, price_in=price_in, price_out=price_out,
             retry_failed=retry_failed, overwrite=overwrite)
    except BaseException:
        _discard_if_empty(out, created)
        raise
    finally:
        os.close(lock)


def _discard_if_empty(out: Path, created: bool) -> None:
    """A run that failed before any sample or error was recorded leaves nothing behind."""
    files = [out / SAMPLES, out / ERRORS]
    if (out / "manifest.json").exists() or any(f.exists() and f.stat().st_size for f in files):
        return
    for f in files + [out / STATE, out / LOCK, out / RUNNING]:
        f.unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------- options


def _builtin_names() -> set[str]:
    from negkd.fewshot import BUILTIN

    return set(BUILTIN)


def _check_options(**o: Any) -> None:
    def bad(flag: str, msg: str) -> None:
        raise typer.BadParameter(msg, param_hint=f"'--{flag}'")

    if o["n"] < 1:
        bad("n", f"must be >= 1, got {o['n']}")
    if o["temperature"] < 0:
        bad("temperature", f"must be >= 0, got {o['temperature']}")
    if not 0 < o["top_p"] <= 1:
        bad("top-p", f"must be in (0, 1], got {o['top_p']}")
    if o["max_tokens"] < 1:
        bad("max-tokens", f"must be >= 1, got {o['max_tokens']}")
    if o["n_per_request"] < 1:
        bad("n-per-request", f"must be >= 1, got {o['n_per_request']}")
    if o["concurrency"] < 1:
        bad("concurrency", f"must be >= 1, got {o['concurrency']}")
    for k in ("rpm", "tpm"):
        if o[k] is not None and o[k] <= 0:
            bad(k, f"must be > 0, got {o[k]}")
    for k in ("price_in", "price_out"):
        if o[k] is not None and o[k] < 0:
            bad(k.replace("_", "-"), f"must be >= 0, got {o[k]}")
    if o["timeout"] <= 0:
        bad("timeout", f"must be > 0, got {o['timeout']}")
    if o["max_retries"] < 0:
        bad("max-retries", f"must be >= 0, got {o['max_retries']}")
    if o["backoff"] < 0:
        bad("backoff", f"must be >= 0, got {o['backoff']}")
    if o["limit"] is not None and o["limit"] < 1:
        bad("limit", f"must be >= 1, got {o['limit']}")
    if o["batch_size"] < 1:
        bad("batch-size", f"must be >= 1, got {o['batch_size']}")


def _parse_shard(spec: str | None) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    try:
        k_s, n_s = spec.split("/")
        k, n = int(k_s), int(n_s)
    except ValueError:
        raise typer.BadParameter(f"expected K/N such as 0/4, got {spec!r}", param_hint="'--shard'") from None
    if n < 1 or not 0 <= k < n:
        raise typer.BadParameter(f"need 0 <= K < N, got {spec!r}", param_hint="'--shard'")
    return k, n


def _renderer(tprompt, backend: Backend, api: Api, chat_template: bool):
    """problem -> what is sent: chat messages, or text."""
    if backend == Backend.openai:
        if api == Api.chat:
            return lambda p, tok: tprompt.chat_messages(p)
        return lambda p, tok: tprompt.completion_text(p)
    if chat_template:
        return lambda p, tok: tok.apply_chat_template(tprompt.chat_messages(p), tokenize=False,
                                                      add_generation_prompt=True)
    return lambda p, tok: tprompt.completion_text(p)


def request_seed(seed: int | None, pid: str, k: int) -> int | None:
    """The seed of the request whose first sample is ``(pid, k)``: stable, int31, spread by a hash."""
    if seed is None:
        return None
    h = hashlib.sha256(f"{seed}\x00{pid}\x00{k}".encode()).digest()
    return int.from_bytes(h[:4], "big") & 0x7FFFFFFF


def _lock(out: Path) -> int:
    """Hold an exclusive lock on DIR for this process's life: two runs must not append to one file."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"{out}: another `negkd sample` is writing to this directory; wait for it or choose "
                        "another -o/--output") from None
    return fd


# --------------------------------------------------------------------------- existing outputs


def read_done(path: Path) -> tuple[set[tuple[str, int]], int]:
    """Keys already in samples.jsonl; a torn last line (no newline: a killed write) is truncated away.

    Returns ``(keys, dropped_bytes)``. Any other bad line is an error naming file:line.
    """
    keys: set[tuple[str, int]] = set()
    if not path.exists():
        return keys, 0
    dropped = 0
    with open(path, "rb+") as fh:
        pos = 0
        for lineno, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):  # only the last line can lack its newline
                dropped = len(raw)
                fh.truncate(pos)
                break
            pos += len(raw)
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key = (str(rec["id"]), int(rec["k"]))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: corrupt sample line (not a JSON object with id and k); "
                                "fix or delete that line, or pass --overwrite to start again") from None
            if key in keys:
                raise UserError(f"{path}:{lineno}: duplicate (id, k) = {key!r}; was another program writing "
                                "to this file? Remove the duplicate line or pass --overwrite")
            keys.add(key)
    return keys, dropped


def read_errors(path: Path) -> dict[tuple[str, int], dict]:
    """errors.jsonl as {(id, k): record}; a torn last line is ignored (it is rewritten later)."""
    out: dict[tuple[str, int], dict] = {}
    if not path.exists():
        return out
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n") or not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                out[(str(rec["id"]), int(rec["k"]))] = rec
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: corrupt line in errors.jsonl; delete it or pass --overwrite") from None
    return out


def _check_partial(out: Path, run: RunDir) -> None:
    """Refuse to resume an unfinished run that was started with other arguments or inputs."""
    has_data = (out / SAMPLES).exists() or (out / ERRORS).exists()
    if not has_data:
        return
    state_path = out / STATE
    if not state_path.exists():
        raise UserError(f"{out}: holds {SAMPLES} or {ERRORS} not written by this version of `negkd sample`; "
                        "pass --overwrite to replace them or choose another -o/--output")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{state_path}: unreadable; pass --overwrite to start again") from None
    prev = state.get("args", {})
    diff = sorted(k for k in set(prev) | set(run.args) if prev.get(k) != run.args.get(k))
    if diff:
        shown = ", ".join(f"--{k.replace('_', '-')} {prev.get(k)!r} -> {run.args.get(k)!r}" for k in diff)
        raise UserError(f"{out}: holds a partial run with other sampling arguments ({shown}); rerun with the "
                        "original arguments to resume, or pass --overwrite to discard it, or choose another -o")
    if [i["sha256"] for i in state.get("inputs", [])] != [i["sha256"] for i in run.inputs]:
        raise UserError(f"{out}: holds a partial run over different input files (the problems or prompt file "
                        "changed); pass --overwrite to discard it or choose another -o")


# --------------------------------------------------------------------------- the run


class _Writer:
    """Append-and-flush writers for samples.jsonl and errors.jsonl (one write() per line)."""

    def __init__(self, out: Path):
        self.samples = open(out / SAMPLES, "ab", buffering=0)
        self.errors = open(out / ERRORS, "ab", buffering=0)
        self.n_samples = 0
        self.n_errors = 0

    def sample(self, rec: dict) -> None:
        self.samples.write((dumps(rec) + "\n").encode("utf-8"))
        self.n_samples += 1

    def error(self, rec: dict) -> None:
        self.errors.write((dumps(rec) + "\n").encode("utf-8"))
        self.n_errors += 1

    def close(self) -> None:
        for fh in (self.samples, self.errors):
            try:
                os.fsync(fh.fileno())
            except OSError:  # pragma: no cover
                pass
            fh.close()


def _run(out: Path, args: dict, inputs: list[Path], probs: list[dict], prompts: dict[str, Any], tprompt,
         tokenizer, *, backend: Backend, base_url: str | None, api: Api, n: int, seed: int | None,
         n_per_request: int, stops: list[str], temperature: float, top_p: float, max_tokens: int,
         concurrency: int, rpm, tpm, timeout: float, max_retries: int, backoff: float, api_key_env: str,
         breaker_s: float, batch_size: int, device: str, dtype: str, price_in, price_out, retry_failed: bool,
         overwrite: bool) -> None:
    run = RunDir(out, "sample", args, inputs=inputs, overwrite=overwrite)
    if overwrite:
        for name in (SAMPLES, ERRORS, STATE):
            (out / name).unlink(missing_ok=True)
    elif run.up_to_date():
        errs = read_errors(out / ERRORS)
        if not errs:
            return
        if not retry_failed:
            warn(f"{len(errs)} samples failed in that run (see {out / ERRORS}); pass --retry-failed to re-attempt them")
            return
        log(f"{out}: re-attempting the {len(errs)} failed samples of the finished run")
    _check_partial(out, run)
    run.start()
    atomic_write_text(out / STATE, json.dumps({"args": run.args, "inputs": run.inputs}, indent=2, allow_nan=False) + "\n")

    done, dropped = read_done(out / SAMPLES)
    if dropped:
        warn(f"{out / SAMPLES}: removed a torn last line ({dropped} bytes) left by an interrupted run")
    errors = read_errors(out / ERRORS)
    wanted = [(p["id"], k) for p in probs for k in range(n)]
    skip = set() if retry_failed else set(errors)
    todo: dict[str, list[int]] = {}
    for pid, k in wanted:
        if (pid, k) not in done and (pid, k) not in skip:
            todo.setdefault(pid, []).append(k)
    # errors.jsonl keeps only failures that stay failed: re-attempted ones leave it now (if the run
    # dies they are simply missing, and the next run asks for them again)
    kept = [r for key, r in errors.items() if key not in done and key in skip]
    atomic_write_text(out / ERRORS, "".join(dumps(r) + "\n" for r in kept))
    n_todo = sum(len(v) for v in todo.values())
    if done or kept:
        log(f"{out}: resuming: {len(done & set(wanted))} of {len(wanted)} samples already there"
            + (f", {len(kept)} failed earlier (--retry-failed re-attempts them)" if kept else "")
            + f"; {n_todo} to go")
    by_id = {p["id"]: p for p in probs}

    stats: dict[str, Any] = {}
    t0 = time.time()
    if n_todo:
        writer = _Writer(out)
        try:
            if backend == Backend.openai:
                stats = _sample_openai(writer, todo, by_id, prompts, base_url=base_url, model=args["model"],
                                       api=api, seed=seed, n_per_request=n_per_request, stops=stops,
                                       temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                       concurrency=concurrency, rpm=rpm, tpm=tpm, timeout=timeout,
                                       max_retries=max_retries, backoff=backoff, api_key_env=api_key_env,
                                       breaker_s=breaker_s)
            else:
                stats = _sample_hf(writer, todo, by_id, prompts, tokenizer, model=args["model"], seed=seed or 0,
                                   stops=stops, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                   batch_size=batch_size, device=device, dtype=dtype,
                                   chat_template=bool(args.get("chat_template")))
        finally:
            writer.close()
    sample_wall = time.time() - t0

    # ---- finish: sort into problem order, account for every (id, k), report
    order = {p["id"]: i for i, p in enumerate(probs)}
    summary = _finalize(out, order, n)
    errors = read_errors(out / ERRORS)
    missing = len(wanted) - summary["in_run"] - len(set(errors) & set(wanted))
    if missing:  # cannot happen unless a request vanished; never finish with silent gaps
        raise UserError(f"{out}: {missing} samples neither written nor recorded as failed; rerun the same "
                        "command to fetch them")
    if summary["samples"] == 0:
        raise UserError(f"every request failed ({len(errors)} samples; reasons in {out / ERRORS}); fix the "
                        "cause and rerun with --retry-failed")
    run.record_output(SAMPLES, records=summary["samples"])
    run.record_output(ERRORS, records=len(errors))
    dup = summary["duplicate_rate"]
    from negkd.client import endpoint_host

    # the host from the URL itself: a resumed run with nothing left to send has no client stats
    endpoint = ({"backend": "openai", "host": endpoint_host(base_url), "api": api.value} if backend == Backend.openai
                else {"backend": "hf", "model_dir": str(args["model"])})
    usage = {"prompt_tokens": summary["prompt_tokens"], "completion_tokens": summary["completion_tokens"]}
    cost = _cost(usage["prompt_tokens"], usage["completion_tokens"], price_in, price_out)
    run.finish(
        endpoint=endpoint,
        model=args["model"],
        sampling=dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                      n_per_request=n_per_request, stop=stops),
        prompt=tprompt.describe(),
        problems=len(probs),
        samples=summary["samples"],
        failed=len(errors),
        truncated=summary["truncated"],
        empty=summary["empty"],
        duplicate_rate=round(dup, 4),
        usage=usage,
        cost=cost,
        this_run=stats | {"sampling_wall_s": round(sample_wall, 3)},
    )
    _report(out, stats, summary, len(errors), len(wanted), sample_wall, price_in, price_out, cost)
    if errors:
        reasons = _top_reasons(errors)
        warn(f"{len(errors)} samples failed for good ({reasons}); listed in {out / ERRORS}. Rerun with "
             "--retry-failed to re-attempt them")
    if summary["empty"]:
        warn(f"{summary['empty']} of {summary['samples']} rationales are empty (whitespace only; split grades them "
             "negative): check --max-tokens, --stop and the prompt, or whether the server decodes at all")
    if dup > DUP_WARN:
        warn(f"{100 * dup:.0f}% of rationales duplicate another one for the same problem: is the seed fixed "
             "for all k, or the temperature ~0? The student learns little from copies")


def _cost(pt: int, ct: int, price_in, price_out) -> float | None:
    if price_in is None and price_out is None:
        return None
    return round(pt / 1e6 * (price_in or 0.0) + ct / 1e6 * (price_out or 0.0), 6)


def _top_reasons(errors: dict) -> str:
    from collections import Counter

    c = Counter(r.get("kind", "error") for r in errors.values())
    return ", ".join(f"{k}: {v}" for k, v in c.most_common(4))


def _finalize(out: Path, order: dict[str, int], n: int) -> dict[str, Any]:
    """Rewrite samples.jsonl in (problem, k) order (atomic) and gather counts for the report.

    Works from line offsets, so memory holds keys and hashes, not the rationales.
    """
    path = out / SAMPLES
    index: list[tuple[int, int, int, int]] = []  # (problem order, k, offset, length)
    per_problem: dict[str, list[bytes]] = {}
    truncated = pt = ct = 0
    extra = 0
    empty = 0  # rationales that were whitespace only (stored as ""): graded negative
    if path.exists():
        with open(path, "rb") as fh:
            pos = 0
            for raw in fh:
                if raw.strip():
                    rec = json.loads(raw)
                    pid, k = str(rec["id"]), int(rec["k"])
                    rank = order.get(pid)
                    if rank is None or not 0 <= k < n:
                        extra += 1
                        rank = len(order)
                    index.append((rank, k, pos, len(raw)))
                    rat = rec.get("rationale", "").strip()
                    empty += not rat
                    per_problem.setdefault(pid, []).append(hashlib.blake2b(rat.encode(), digest_size=8).digest())
                    meta = rec.get("meta") or {}
                    if meta.get("finish_reason") == "length":
                        truncated += 1
                    u = meta.get("usage") or {}
                    pt += int(u.get("prompt_tokens") or 0)
                    ct += int(u.get("completion_tokens") or 0)
                pos += len(raw)
        if extra:
            warn(f"{path}: {extra} lines belong to problems or k outside this run; kept at the end of the file")
        if [x[:2] for x in index] != sorted(x[:2] for x in index):
            index.sort()
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                for _, _, off, length in index:
                    src.seek(off)
                    dst.write(src.read(length))
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
    total = sum(len(v) for v in per_problem.values())
    dups = sum(len(v) - len(set(v)) for v in per_problem.values())
    return {"samples": len(index), "in_run": len(index) - extra, "duplicate_rate": dups / total if total else 0.0, "duplicates": dups,
            "truncated": truncated, "empty": empty, "prompt_tokens": pt, "completion_tokens": ct}


def _report(out: Path, stats: dict, summary: dict, failed: int, wanted: int, wall: float, price_in, price_out,
            cost) -> None:
    from rich.table import Table

    from negkd.console import out as stdout

    t = Table(title=f"negkd sample -> {out}", show_header=False, title_justify="left")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("samples", f"{summary['samples']:,} of {wanted:,}")
    t.add_row("failed (errors.jsonl)", f"{failed:,}")
    if stats:
        t.add_row("this run: requests sent", f"{stats.get('requests', 0):,}")
        t.add_row("this run: retries", f"{stats.get('retries', 0):,}")
        t.add_row("this run: requests failed", f"{stats.get('failed', 0):,}")
        t.add_row("this run: samples written", f"{stats.get('written', 0):,}")
        t.add_row("this run: wall time", f"{wall:.1f} s")
        if wall > 0 and stats.get("written"):
            t.add_row("this run: throughput", f"{stats['written'] / wall:.1f} samples/s")
        if stats.get("errors"):
            t.add_row("this run: errors by kind", ", ".join(f"{k} {v}" for k, v in stats["errors"].items()))
    t.add_row("prompt tokens (all runs)", f"{summary['prompt_tokens']:,}")
    t.add_row("completion tokens (all runs)", f"{summary['completion_tokens']:,}")
    if cost is not None:
        t.add_row("cost (all runs)", f"${cost:,.4f}")
    t.add_row("truncated at max-tokens", f"{summary['truncated']:,}")
    t.add_row("empty rationales", f"{summary['empty']:,}")
    t.add_row("duplicate rationales", f"{100 * summary['duplicate_rate']:.1f}%")
    stdout.print(t)


# --------------------------------------------------------------------------- backends


def _sample_openai(writer: _Writer, todo: dict[str, list[int]], by_id: dict[str, dict], prompts: dict[str, Any],
                   *, base_url: str, model: str, api: Api, seed: int | None, n_per_request: int,
                   stops: list[str], temperature: float, top_p: float, max_tokens: int, concurrency: int, rpm,
                   tpm, timeout: float, max_retries: int, backoff: float, api_key_env: str,
                   breaker_s: float = 10.0) -> dict[str, Any]:
    import asyncio

    from negkd.client import FatalError, Job, NChoices, RequestFailed, SamplingParams, Teacher, run_jobs
    from negkd.console import progress

    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stops or None)
    state = {"written": 0, "failed_samples": 0}
    total = sum(len(v) for v in todo.values())
    nc = NChoices(n_per_request, on_fallback=lambda why: warn(
        f"{why}; falling back to one request per sample (--n-per-request 1)"))

    def jobs():
        for pid, ks in todo.items():
            for chunk in nc.chunks(ks):
                yield _job(pid, chunk)

    def _job(pid: str, ks: list[int]) -> Job:
        return Job(prompts[pid], n=len(ks), seed=request_seed(seed, pid, ks[0]), tag=(pid, ks))

    async def main() -> dict[str, Any]:
        teacher = Teacher(base_url, model, api=api.value, api_key_env=api_key_env, timeout=timeout,
                          max_retries=max_retries, concurrency=concurrency, rpm=rpm, tpm=tpm, backoff=backoff,
                          breaker_s=breaker_s)
        cols = (_StatusColumn(),)
        try:
            with progress(*cols) as bar:
                task = bar.add_task(f"sampling {model}", total=total, retries=0, failed=0)

                def on_retry(kind: str) -> None:
                    bar.update(task, retries=teacher.stats.retries)

                teacher.on_retry = on_retry

                def on_result(job: Job, res) -> list[Job] | None:
                    pid, ks = job.tag
                    prob = by_id[pid]
                    if isinstance(res, RequestFailed):
                        for k in ks:
                            writer.error({"id": pid, "k": k, "reason": res.reason, "kind": res.kind,
                                          "status": res.status, "attempts": res.attempts,
                                          "seed": job.seed, "time": _now()})
                        state["failed_samples"] += len(ks)
                        bar.update(task, advance=len(ks), failed=state["failed_samples"])
                        return None
                    # res is a Response, or the FatalError of a rejected n > 1 (nc.fatal_handler)
                    choices, left = nc.take(job, res, ks)
                    for j, (k, c) in enumerate(zip(ks, choices)):
                        meta: dict[str, Any] = {"seed": job.seed, "finish_reason": c.finish_reason,
                                                "model": res.model or model, "attempts": res.attempts}
                        if job.n > 1:
                            meta["choice"] = j
                        if j == 0:  # request-level usage, on one sample per request so totals add up
                            meta["usage"] = {"prompt_tokens": res.prompt_tokens,
                                             "completion_tokens": res.completion_tokens, "n": job.n}
                        writer.sample({**prob, "k": k, "rationale": c.text.strip(), "meta": meta})
                    state["written"] += len(choices)
                    bar.update(task, advance=len(choices))
                    return [_job(pid, [k]) for k in left] or None  # fewer choices than asked: one by one

                t0, c0 = time.perf_counter(), time.process_time()
                await run_jobs(teacher, jobs(), params, on_result, fatal_handler=nc.fatal_handler)
                state["requests_wall_s"] = round(time.perf_counter() - t0, 3)
                state["requests_cpu_s"] = round(time.process_time() - c0, 3)
        finally:
            await teacher.aclose()
        return teacher.stats.as_dict() | {"written": state["written"],
                                          "requests_wall_s": state.get("requests_wall_s"),
                                          "requests_cpu_s": state.get("requests_cpu_s"),
                                          "failed_samples": state["failed_samples"],
                                          "n_per_request_used": nc.n_per_request}

    try:
        return asyncio.run(main())
    except FatalError as e:
        kept = (f" The {writer.n_samples} samples received before it are kept in {writer.samples.name}; "
                "rerun the same command to resume." if writer.n_samples else "")
        raise UserError(f"{e}; stopped.{kept}") from None


def _status_column_class():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class StatusColumn(ProgressColumn):
        """samples/s, retries and failures of the sampling bar."""

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed or 0.0
            f = task.fields
            return Text(f"{speed:.1f}/s retries {f.get('retries', 0)} failed {f.get('failed', 0)}")

    return StatusColumn


def _StatusColumn():
    return _status_column_class()()


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sample_hf(writer: _Writer, todo: dict[str, list[int]], by_id: dict[str, dict], prompts: dict[str, str],
               tokenizer, *, model: str, seed: int, stops: list[str], temperature: float, top_p: float,
               max_tokens: int, batch_size: int, device: str, dtype: str, chat_template: bool) -> dict[str, Any]:
    """Local sampling with negkd.generation (batched HF generate). Problems are grouped by how many
    samples they still miss (after a resume that differs), one generate pass per group."""
    from negkd.console import progress
    from negkd.generation import iter_generate
    from negkd.modeling import load_model

    mdl = load_model(model, device=device, dtype=dtype)
    groups: dict[int, list[str]] = {}
    for pid, ks in todo.items():
        groups.setdefault(len(ks), []).append(pid)
    total = sum(len(v) for v in todo.values())
    written = 0
    gen_tokens = 0
    with progress() as bar:
        task = bar.add_task(f"sampling {Path(model).name}", total=total)
        for m, pids in sorted(groups.items()):
            texts = [prompts[p] for p in pids]
            group_seed = request_seed(seed, f"hf-group-{m}", 0)
            for i, gens in iter_generate(mdl, tokenizer, texts, n=m, temperature=temperature, top_p=top_p,
                                         max_new_tokens=max_tokens, batch_size=batch_size, seed=group_seed,
                                         add_special_tokens=not chat_template):
                pid = pids[i]
                n_prompt = len(tokenizer(texts[i], add_special_tokens=not chat_template)["input_ids"])
                for k, g in zip(todo[pid], gens):
                    text, hit_stop = _cut_at_stop(g.text, stops)
                    finish = "stop" if (g.finished or hit_stop) else "length"
                    meta = {"seed": group_seed, "finish_reason": finish, "model": str(model), "backend": "hf",
                            "usage": {"prompt_tokens": n_prompt, "completion_tokens": g.n_tokens, "n": 1}}
                    writer.sample({**by_id[pid], "k": k, "rationale": text.strip(), "meta": meta})
                    written += 1
                    gen_tokens += g.n_tokens
                bar.update(task, advance=len(gens))
    return {"requests": 0, "retries": 0, "failed": 0, "written": written, "completion_tokens": gen_tokens}


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# --------------------------------------------------------------------------- dry run


def _dry_run(out: Path, probs: list[dict], prompts: dict[str, Any], *, n: int, n_per_request: int, max_tokens: int,
             tokenizer, price_in, price_out, retry_failed: bool) -> None:
    from rich.table import Table

    from negkd.client import estimate_tokens
    from negkd.console import out as stdout

    done: set = set()
    errors: dict = {}
    if (out / SAMPLES).exists():
        done = _peek_done(out / SAMPLES)
    if (out / ERRORS).exists() and not retry_failed:
        errors = read_errors(out / ERRORS)
    requests = samples = ptoks = 0
    for p in probs:
        miss = [k for k in range(n) if (p["id"], k) not in done and (p["id"], k) not in errors]
        if not miss:
            continue
        reqs = -(-len(miss) // n_per_request)
        requests += reqs
        samples += len(miss)
        if tokenizer is not None:
            pt = len(tokenizer(prompts[p["id"]], add_special_tokens=False)["input_ids"])
        else:
            pt = estimate_tokens(prompts[p["id"]])
        ptoks += pt * reqs
    exact = tokenizer is not None
    t = Table(title=f"negkd sample --dry-run ({out})", show_header=False, title_justify="left")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("problems", f"{len(probs):,}")
    t.add_row("samples wanted", f"{len(probs) * n:,}")
    t.add_row("already done", f"{len(done):,}")
    if errors:
        t.add_row("failed earlier (skipped; --retry-failed)", f"{len(errors):,}")
    t.add_row("samples to request", f"{samples:,}")
    t.add_row("requests", f"{requests:,}")
    t.add_row("prompt tokens" + ("" if exact else " (estimate: ~4 chars/token)"), f"{ptoks:,}")
    t.add_row("completion tokens (at most)", f"{samples * max_tokens:,}")
    if price_in is not None or price_out is not None:
        lo = ptoks / 1e6 * (price_in or 0.0)
        hi = lo + samples * max_tokens / 1e6 * (price_out or 0.0)
        t.add_row("cost", f"${lo:,.4f} prompt + up to ${hi - lo:,.4f} completion")
    stdout.print(t)
    log("dry run: nothing was sent or written")


def _peek_done(path: Path) -> set[tuple[str, int]]:
    """Like read_done but read-only (a dry run changes nothing)."""
    keys = set()
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n") or not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                keys.add((str(rec["id"]), int(rec["k"])))
            except (ValueError, KeyError, TypeError):
                continue
    return keys
