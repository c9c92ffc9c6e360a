"""THE training loop: one ``fit()`` on ``accelerate.Accelerator`` for every training command.

``fit`` is generic: a list of items, a ``collate_fn``, optional ``lengths`` for length-grouped
batching, a ``loss_fn(model, batch) -> (loss, logs)``, and the model's parameters that have
``requires_grad``. The same code runs on one CPU, one GPU, or N processes under
``accelerate launch`` (DDP; FSDP/DeepSpeed through an accelerate config), logging and saving
on the main process only.

API (used by train-neg, train-pos, calibrate, train-ranker)::

    acc = make_accelerator(device)                      # before loading the model: acc.device
    res = fit(model, examples, config=TrainConfig(...), out_dir=out,
              collate_fn=Collator(pad_id), lengths=data.lengths(examples),
              loss_fn=lm_loss, weight_fn=lm_weight,     # defaults shown
              save_fn=None, metrics_fn=None, fingerprint={...}, resume=False, accelerator=acc)
    res.model      # the trained, unwrapped model (same object you passed in, trained in place)

- ``loss_fn(model, batch) -> (loss, logs)``: ``loss`` a scalar tensor (mean over the micro-batch),
  ``logs`` a dict of scalars (tensors or floats) averaged into metrics.jsonl. ``batch`` is
  ``collate_fn(items)`` moved to the device (tensors only; lists such as ``id``/``k`` pass
  through untouched, so per-example keys like ``idx`` reach the callback).
- ``weight_fn(batch) -> number``: the weight of a micro-batch in its optimizer step (default for
  causal LMs: its number of target tokens, so gradient accumulation and DDP average over
  *tokens*, not micro-batches). ``None``: every micro-batch weighs the same.
- ``save_fn(unwrapped_model, dir)``: writes a usable payload (e.g. a PEFT adapter) into each
  checkpoint so intermediate checkpoints are usable artefacts too. Resuming never relies on it:
  the checkpoint also holds every trainable tensor by name.
- ``metrics_fn(unwrapped_model) -> dict``: extra scalars at each log step (e.g. NAT's mean
  g_neg per layer); same keys on every process (they are averaged across processes).
- K component losses: ``weight_fn`` may return K weights (a ``(K,)`` tensor) when ``loss_fn``
  returns K losses ``(K,)``, each a mean over its own units (NT/UL: positive tokens and negative
  tokens). Each component is then averaged over *its own* units across the whole optimizer step
  (all micro-batches and processes) and the objective is their sum; metrics.jsonl logs the
  objective as ``loss`` and each component under the names in ``loss_fn.parts`` (if set).
- ``fingerprint``: what must not change between an interrupted run and its ``--resume``
  (data hashes, model, adapter config); fit adds its own config (except the run length) and
  the world size.

Outputs in ``out_dir``: ``metrics.jsonl`` (one record per ``log_every`` steps: step, epoch,
loss, lr, grad_norm, tokens/s, padding share, extra logs) and ``checkpoints/step-NNNNNNNN/``
(trainable tensors, optimizer, scheduler, per-process RNG, trainer_state.json written last).
Only the newest checkpoint is kept; a checkpoint is always written at the last step.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from negkd.errors import UsageError, UserError
from negkd.io import read_json

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
# config keys a --resume may change: they set the run's length, not its trajectory so far
RUN_LENGTH_KEYS = ("epochs", "max_steps", "save_every", "log_every")


@dataclass
class TrainConfig:
    batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 3e-4
    warmup: float = 0.03  # < 1: fraction of total steps; >= 1: steps
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    log_every: int = 10
    group_by_length: bool = True
    max_batch_tokens: int | None = None  # padded tokens per micro-batch (None: batch_size items each)


@dataclass
class FitResult:
    model: Any
    step: int
    total_steps: int
    steps_per_epoch: int
    resumed_from: int | None
    seconds: float
    tokens: int  # non-padding tokens processed by all processes in this invocation
    padded_tokens: int  # positions computed (incl. padding)
    history: list[dict] = field(default_factory=list)  # metrics records written in this invocation
    peak_memory_gb: float | None = None  # CUDA only: peak allocated on this process's device

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def padding_share(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


# ---------------------------------------------------------------- accelerator


def make_accelerator(device: str = "auto", find_unused_parameters: bool = False):
    """An Accelerator for ``--device`` (create it *before* loading the model; load onto ``acc.device``).

    Model placement is left to the caller (``device_placement=False``), so quantized models
    loaded with a device_map and explicit ``cuda:N`` devices work unchanged.
    ``find_unused_parameters`` is for models where some *trainable* parameters can miss the
    graph in a step (frozen parameters are never a problem: DDP ignores them).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    acc = Accelerator(cpu=device == "cpu", device_placement=False, kwargs_handlers=handlers)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and acc.num_processes == 1:
        raise UserError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate set up none of them as a "
                        "group (each would train alone into the same DIR); on a machine without GPUs run "
                        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ... (DDP over gloo)")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and acc.distributed_type.value != "FSDP":
        from negkd.console import warn

        if acc.is_main_process:
            warn(f"the FSDP config is ignored: accelerate enables FSDP only on GPUs/accelerators; this run is "
                 f"{acc.distributed_type.value} (on CPU: DDP over gloo)")
    if acc.num_processes > 1 and acc.distributed_type.value == "MULTI_CPU":
        import torch

        # two processes on a few cores: don't oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // acc.num_processes))
    return acc


def model_device(acc, device: str):
    """Where the model of this process goes: the accelerator's device unless ``cuda:N`` is explicit
    in a single-process run."""
    import torch

    if device.startswith("cuda:") and acc.num_processes == 1:
        from negkd.modeling import resolve_device

        return resolve_device(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    return acc.device


# ---------------------------------------------------------------- default causal-LM callbacks


def lm_loss(model, batch):
    """Masked next-token NLL over the completion (labels -100 elsewhere). The logits of the leading
    positions no row trains on (the batch's shortest prompt) are never computed when the model's
    forward takes ``logits_to_keep`` (transformers' causal LMs do)."""
    from negkd.losses import masked_nll

    labels = batch["labels"]
    skip = first_target(labels) if keeps_logits(model) else 0
    kw = {"logits_to_keep": labels.shape[1] - skip} if skip else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **kw)
    loss = masked_nll(out.logits, labels[:, skip:])  # logits (B, L - skip, V)
    return loss, {}


def first_target(labels) -> int:
    """Leading positions no row of ``labels`` (B, L) trains on: the first t whose next token is a target
    in some row (0 when there is none)."""
    from negkd.losses import IGNORE_INDEX

    counted = (labels[:, 1:] != IGNORE_INDEX).any(0)  # (L-1,)
    return int(counted.int().argmax()) if bool(counted.any()) else 0


def keeps_logits(model) -> bool:
    """Does the (possibly DDP / PEFT wrapped) model's forward take ``logits_to_keep``?"""
    import inspect

    import torch

    m = model
    while isinstance(getattr(m, "module", None), torch.nn.Module):
        m = m.module  # DDP and accelerate wrappers
    base = m.get_base_model() if hasattr(m, "get_base_model") else m
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def lm_weight(batch) -> Any:
    from negkd.losses import n_targets

    return n_targets(batch["labels"])


# ---------------------------------------------------------------- schedule


def lr_lambda(total: int, warmup: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak LR after ``step`` scheduler steps (a closure: LambdaLR does not
    pickle closures, so a resumed run with a longer --max-steps uses its new length)."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        span = max(1, total - warmup)
        prog = min(1.0, (step - warmup) / span)
        if schedule == "linear":
            return 1.0 - prog
        return 0.5 * (1.0 + math.cos(math.pi * prog))

    return f


def warmup_steps(warmup: float, total: int) -> int:
    return int(math.ceil(warmup * total)) if warmup < 1 else int(warmup)


# ---------------------------------------------------------------- batch plan


class Plan:
    """Which items each process sees at each optimizer step, deterministic from (seed, epoch).

    Per epoch: micro-batches (length-grouped), padded to a multiple of the world size by
    repeating the first ones, dealt round-robin to processes, then cut into optimizer steps of
    ``grad_accum`` micro-batches (the last step of an epoch may have fewer, on every process).

    With a token budget (``max_tokens``) an optimizer step covers exactly the same items; only
    their cut into forward passes changes: each process's items of the step are re-cut by
    ``data.budget_split`` into micro-batches of at most ``max_tokens`` padded tokens (an item
    over the budget alone), and every process runs as many passes as the one that needs the most
    (FSDP/DDP collectives must pair up): extra passes repeat the step's shortest item with weight 0
    (``Filler``).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, grad_accum: int, world: int, rank: int,
                 seed: int, group_by_length: bool = True, max_tokens: int | None = None, rows_per_item: int = 1):
        self.lengths, self.bs, self.ga = list(lengths), batch_size, grad_accum
        self.world, self.rank, self.seed, self.group = world, rank, seed, group_by_length
        self.max_tokens, self.rows_per_item = max_tokens, rows_per_item
        n_micro = math.ceil(len(self.lengths) / batch_size)
        self.micro_per_rank = math.ceil(n_micro / world)
        self.steps_per_epoch = math.ceil(self.micro_per_rank / grad_accum)
        self._cache: dict[int, list[list[list[int]]]] = {}

    def epoch(self, e: int) -> list[list[list[int]]]:
        if e not in self._cache:
            from negkd.data import length_grouped_batches, random_batches

            if self.group:
                batches = length_grouped_batches(self.lengths, self.bs, self.seed, e)
            else:
                batches = random_batches(len(self.lengths), self.bs, self.seed, e)
            need = self.micro_per_rank * self.world
            batches = batches + [batches[i % len(batches)] for i in range(need - len(batches))]
            steps = [[b[i:i + self.ga] for i in range(0, len(b), self.ga)]
                     for b in (batches[r::self.world] for r in range(self.world))]
            mine = steps[self.rank]
            if self.max_tokens:
                mine = [self._budgeted([steps[r][j] for r in range(self.world)]) for j in range(len(mine))]
            self._cache = {e: mine}
        return self._cache[e]

    def _budgeted(self, step_per_rank: list[list[list[int]]]) -> list[list[int]]:
        """This process's micro-batches of one step under the token budget (see the class docstring)."""
        from negkd.data import budget_split

        def items(micro):
            return [i for mb in micro for i in mb]

        split = lambda rows, k=1: budget_split(rows, self.lengths, self.max_tokens, self.rows_per_item, k)  # noqa: E731
        k = max(len(split(items(m))) for m in step_per_rank)
        rows = items(step_per_rank[self.rank])
        parts = split(rows, k)
        shortest = min(rows, key=lambda i: self.lengths[i])
        return parts + [Filler([shortest]) for _ in range(k - len(parts))]

    def step(self, s: int) -> tuple[int, list[list[int]]]:
        """(epoch, micro-batches) of global optimizer step ``s`` (0-based)."""
        e, j = divmod(s, self.steps_per_epoch)
        return e, self.epoch(e)[j]


class Filler(list):
    """A micro-batch that only pads a process's pass count (token budget): forward and backward run,
    with weight 0, and nothing is logged or counted."""


def _micro_weight(mb, batch, weight_fn, device):
    """A micro-batch's weight in the step's average: ``weight_fn(batch)`` (() or (K,)), else its row
    count; zeros of the same shape for a Filler."""
    import torch

    w = torch.as_tensor(weight_fn(batch) if weight_fn is not None else len(mb), device=device, dtype=torch.float64)
    return torch.zeros_like(w) if isinstance(mb, Filler) else w


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json present), oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    cks = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "trainer_state.json").exists()]
    return sorted(cks, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    cks = checkpoint_dirs(out_dir)
    return cks[-1] if cks else None


def _rng_state() -> dict:
    import numpy as np
    import torch

    # numpy's state as plain values + a tensor: rng_state_*.pt loads with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"python": random.getstate(), "torch": torch.get_rng_state(),
          "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import numpy as np
    import torch

    random.setstate(st["python"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def trainable_state(model) -> dict:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _diff(a: dict, b: dict) -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def _uses_sharded_state(acc) -> bool:
    return acc.distributed_type.value in ("DEEPSPEED", "MEGATRON_LM")


def _is_fsdp(acc) -> bool:
    """FSDP: checkpoints hold the gathered adapter tensors (negkd.sharded), as a single process writes them."""
    return acc.distributed_type.value == "FSDP"


# ---------------------------------------------------------------- fit


def fit(model, dataset: Sequence[Any], *, config: TrainConfig, out_dir: Path,
        collate_fn: Callable[[list], dict], lengths: Sequence[int] | None = None,
        loss_fn: Callable | None = None, weight_fn: Callable | None | str = "auto",
        save_fn: Callable | None = None, metrics_fn: Callable | None = None,
        fingerprint: dict | None = None, resume: bool = False, accelerator=None,
        find_unused_parameters: bool = False, desc: str = "train", rows_per_item: int = 1) -> FitResult:
    """Train ``model``'s ``requires_grad`` parameters on ``dataset``; see the module docstring.

    ``rows_per_item``: sequences ``collate_fn`` makes of one item (2 for (positive, negative)
    pairs), for ``config.max_batch_tokens``. Under a budget with ``weight_fn=None`` every item
    weighs the same (a micro-batch weighs its number of items)."""
    import torch
    from accelerate.utils import set_seed

    from negkd.console import log, progress

    acc = accelerator if accelerator is not None else make_accelerator(find_unused_parameters=find_unused_parameters)
    loss_fn = loss_fn or lm_loss
    if weight_fn == "auto":
        weight_fn = lm_weight if loss_fn is lm_loss else None
    out_dir = Path(out_dir)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    n = len(dataset)
    if n == 0:
        raise UserError("no training examples")
    lengths = list(lengths) if lengths is not None else [1] * n
    if len(lengths) != n:
        raise ValueError(f"lengths has {len(lengths)} entries for {n} items")

    plan = Plan(lengths, config.batch_size, config.grad_accum, world, rank, config.seed, config.group_by_length,
                config.max_batch_tokens, rows_per_item)
    total = _total_steps(config, plan)
    n_warm = warmup_steps(config.warmup, total)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters (nothing has requires_grad)")
    fp = _fit_fingerprint(model, config, fingerprint, world, lengths)
    ck = _resume_checkpoint(out_dir, resume, fp, total)

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, n_warm, config.schedule))
    set_seed(config.seed + rank)
    wrapped, optimizer = acc.prepare(model, optimizer)
    unwrapped = acc.unwrap_model(wrapped)
    params = [p for p in unwrapped.parameters() if p.requires_grad]  # FSDP2 swapped them for shards
    device = next(p.device for p in unwrapped.parameters() if p.requires_grad)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    metrics_path = out_dir / METRICS
    step, resumed_from = 0, None
    if ck is not None:
        step = _load_checkpoint(ck, acc, unwrapped, wrapped, optimizer, scheduler, rank)
        resumed_from = step
        log(f"resuming from {ck} (step {step}/{total})")
    elif resume and main:
        log(f"--resume: no checkpoint in {out_dir} yet; starting from step 0")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _trim_metrics(metrics_path, step)
    acc.wait_for_everyone()

    if main:
        eff = config.batch_size * config.grad_accum * world
        log(f"{desc}: {n:,} examples, {plan.steps_per_epoch:,} steps/epoch, {total:,} steps "
            f"(effective batch {eff} = {config.batch_size} x {config.grad_accum} accum x {world} process"
            f"{'es, ' + acc.distributed_type.value if world > 1 else ''}), {sum(p.numel() for p in params):,} trainable parameters"
            + (f"; micro-batches of <= {config.max_batch_tokens:,} padded tokens" if config.max_batch_tokens else ""))

    # running sums between log steps (device tensors: no host sync per step)
    zero = lambda: torch.zeros((), device=device, dtype=torch.float64)  # noqa: E731
    acc_loss, acc_w, acc_tok, acc_pad = zero(), zero(), zero(), zero()
    acc_logs: dict[str, Any] = {}
    last_log_t, last_log_step = time.perf_counter(), step
    t_start = time.perf_counter()
    tot_tok = tot_pad = 0.0
    history: list[dict] = []
    grad_norm = None

    wrapped.train()
    try:
        from rich.progress import TextColumn

        with progress(TextColumn("loss {task.fields[loss]} lr {task.fields[lr]}"), disable=not main) as bar:
            task = bar.add_task(desc, total=total, loss="-", lr="-")
            if step:
                bar.update(task, completed=step)
            while step < total:
                epoch, micro = plan.step(step)
                batches = [_to_device(collate_fn([dataset[i] for i in mb]), device) for mb in micro]
                if weight_fn is not None or config.max_batch_tokens:
                    ws = [_micro_weight(mb, b, weight_fn, device) for mb, b in zip(micro, batches)]
                    w_local = torch.stack(ws).sum(0)  # () or (K,): see "K component losses" above
                    w_all = acc.reduce(w_local.clone(), reduction="sum") if world > 1 else w_local
                    scales = [world * w / w_all.clamp_min(1e-12) for w in ws]
                else:
                    ws = [torch.ones((), device=device, dtype=torch.float64) for _ in batches]
                    scales = [torch.tensor(1.0 / len(batches), device=device, dtype=torch.float64) for _ in batches]
                for i, (batch, w, sc) in enumerate(zip(batches, ws, scales)):
                    sync = i == len(batches) - 1
                    with (nullcontext() if sync else acc.no_sync(wrapped)):
                        loss, logs = loss_fn(wrapped, batch)
                        acc.backward((loss * sc.to(loss.dtype)).sum())
                    if loss.dim():  # K components: log the step's exact objective and each component's mean
                        parts = loss.detach().double() * sc * len(batches)  # (K,), sums to the objective
                        names = getattr(loss_fn, "parts", None) or [f"loss_{k}" for k in range(len(parts))]
                        logs = {**(logs or {}), **dict(zip(names, parts))}
                        loss, w = parts.sum(), torch.tensor(1.0 / (world * len(batches)), device=device,
                                                            dtype=torch.float64)
                    acc_loss += loss.detach().double() * w
                    acc_w += w
                    for k, v in (logs or {}).items():
                        v = torch.as_tensor(v, device=device).detach().double()
                        acc_logs[k] = acc_logs.get(k, 0) + v * w
                    if "attention_mask" in batch and not isinstance(micro[i], Filler):
                        acc_tok += batch["attention_mask"].sum()
                        acc_pad += batch["attention_mask"].numel()
                if config.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                if step % config.log_every == 0 or step == total:
                    keys = sorted(acc_logs)
                    vec = torch.stack([acc_loss, acc_w, acc_tok, acc_pad] + [acc_logs[k] for k in keys])
                    extra = metrics_fn(unwrapped) if metrics_fn is not None else {}
                    ekeys = sorted(extra)
                    evec = torch.tensor([float(extra[k]) for k in ekeys], device=device, dtype=torch.float64)
                    if world > 1:
                        vec = acc.reduce(vec, reduction="sum")
                        evec = acc.reduce(evec, reduction="mean") if len(ekeys) else evec
                    vals = vec.tolist()
                    if not math.isfinite(vals[0]):  # every rank sees the same reduced sum: all stop together
                        raise _diverged(step, vals[0] / max(vals[1], 1e-12), config)
                    now = time.perf_counter()
                    dt = now - last_log_t
                    wsum = max(vals[1], 1e-12)
                    rec = {"step": step, "epoch": round(epoch + (step - epoch * plan.steps_per_epoch) / plan.steps_per_epoch, 4),
                           "loss": vals[0] / wsum, "lr": scheduler.get_last_lr()[0]}
                    if grad_norm is not None:
                        rec["grad_norm"] = float(grad_norm)
                    if vals[3]:
                        rec["tokens"] = int(vals[2])
                        rec["tokens_per_s"] = round(vals[2] / dt, 1) if dt > 0 else None
                        rec["padding"] = round(1 - vals[2] / vals[3], 4)
                    rec["steps_per_s"] = round((step - last_log_step) / dt, 3) if dt > 0 else None
                    if cuda:
                        rec["mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
                    for k, v in zip(keys, vals[4:]):
                        rec[k] = v / wsum
                    rec.update({k: round(v, 6) for k, v in zip(ekeys, evec.tolist())})
                    if any(isinstance(v, float) and not math.isfinite(v) for v in rec.values()):
                        raise _diverged(step, rec["loss"], config)  # e.g. an infinite gradient norm
                    tot_tok += vals[2]
                    tot_pad += vals[3]
                    history.append(rec)
                    if main:
                        with open(metrics_path, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(rec, allow_nan=False) + "\n")
                    acc_loss, acc_w, acc_tok, acc_pad = zero(), zero(), zero(), zero()
                    acc_logs = {}
                    last_log_t, last_log_step = now, step
                    bar.update(task, completed=step, loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                else:
                    bar.update(task, completed=step)

                if step == total or (config.save_every and step % config.save_every == 0):
                    _check_finite(acc, params, acc_loss, step, config)  # never save (or finish) a NaN model
                    _save_checkpoint(out_dir, step, acc, unwrapped, wrapped, optimizer, scheduler, fp, save_fn,
                                     {"epoch": epoch, "total_steps": total})
    except KeyboardInterrupt:
        ck = latest_checkpoint(out_dir)
        where = f"the last checkpoint is {ck.name}" if ck else "no checkpoint was saved yet"
        log(f"interrupted at step {step}/{total}; {where}. Rerun the same command with --resume to continue.")
        raise

    seconds = time.perf_counter() - t_start
    if _is_fsdp(acc):  # callers save the result on the main process: hand them full adapter tensors
        from negkd import sharded

        sharded.keep_plain_adapters(unwrapped, sharded.full_adapter_state(unwrapped))
    return FitResult(model=unwrapped, step=step, total_steps=total, steps_per_epoch=plan.steps_per_epoch,
                     resumed_from=resumed_from, seconds=seconds, tokens=int(tot_tok), padded_tokens=int(tot_pad),
                     history=history,
                     peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None)


def _diverged(step: int, loss: float, config: TrainConfig) -> UserError:
    return UserError(f"training diverged: the loss is {loss} at step {step} (--lr {config.lr:g}); nothing was saved "
                     "for this step and the run is not finished. Lower --lr (or raise --warmup / set "
                     "--max-grad-norm) and rerun with --overwrite")


def _check_finite(acc, params, acc_loss, step: int, config: TrainConfig) -> None:
    """Raise (on every rank alike) if the loss since the last log or any trainable weight is NaN/inf."""
    import torch

    # under FSDP2 a parameter is a DTensor: check this rank's shard; the sum below covers every shard
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    bad = (~torch.isfinite(acc_loss)).double() + sum((~torch.isfinite(t)).any().double() for t in local)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    if float(bad) > 0:
        raise _diverged(step, float(acc_loss) if not torch.isfinite(acc_loss) else float("nan"), config)


def check_resume(model, lengths: Sequence[int], *, config: TrainConfig, out_dir: Path, fingerprint: dict | None,
                 resume: bool, world_size: int = 1) -> None:
    """fit()'s checks of ``out_dir``'s checkpoints (--resume allowed, same settings, not past the
    run's end), without touching anything: call it before a step changes its output directory
    (``RunDir.start``), so a refused resume leaves a finished run exactly as it was. Pass what
    fit() will get (the attached model, the same lengths and fingerprint)."""
    lengths = list(lengths)
    plan = Plan(lengths, config.batch_size, config.grad_accum, world_size, 0, config.seed, config.group_by_length)
    fp = _fit_fingerprint(model, config, fingerprint, world_size, lengths)
    _resume_checkpoint(out_dir, resume, fp, _total_steps(config, plan))


def _total_steps(config: TrainConfig, plan: Plan) -> int:
    return config.max_steps or max(1, math.ceil(config.epochs * plan.steps_per_epoch))


def _fit_fingerprint(model, config: TrainConfig, fingerprint: dict | None, world: int, lengths: list[int]) -> dict:
    fp = {**(fingerprint or {}),
          **{f"train.{k}": v for k, v in asdict(config).items()
             if k not in RUN_LENGTH_KEYS and not (k == "max_batch_tokens" and v is None)},
          "train.world_size": world, "train.n_items": len(lengths),
          "train.lengths_sha": _sha(json.dumps(lengths)),
          "train.trainable": sorted(n_ for n_, p in model.named_parameters() if p.requires_grad)}
    return json.loads(json.dumps(fp, default=str))


def _resume_checkpoint(out_dir: Path, resume: bool, fp: dict, total: int) -> Path | None:
    """The checkpoint to resume from (None: start at step 0); raises when DIR's checkpoints cannot be used."""
    ck = latest_checkpoint(out_dir)
    if ck is None:
        return None
    if not resume:
        raise UserError(f"{out_dir}: holds checkpoints of an earlier run (last: {ck.name}); pass --resume to continue "
                        "it or --overwrite to start over")
    st = read_json(ck / "trainer_state.json", dict, fix="the checkpoint is damaged: pass --overwrite to start over")
    if not isinstance(st.get("step"), int) or not isinstance(st.get("fingerprint", {}), dict):
        raise UserError(f"{ck / 'trainer_state.json'}: no integer 'step'; the checkpoint is damaged: pass "
                        "--overwrite to start over")
    diff = _diff(st.get("fingerprint", {}), fp)
    if diff:
        raise UserError(f"--resume: {ck} was made with other settings or data ({'; '.join(diff)[:400]}); rerun with "
                        "the original flags and inputs, or pass --overwrite to start over")
    step = int(st["step"])
    if step > total:
        raise UserError(f"--resume: the checkpoint in {ck.parent} is at step {step}, beyond this run's {total} "
                        "steps; raise --max-steps/--epochs or pass --overwrite")
    verify_checkpoint(ck)  # before the step touches DIR: a bad checkpoint leaves a finished run as it was
    return ck


def safe_torch_load(path: Path):
    """``torch.load`` of tensors and plain containers only (``weights_only=True``): a pickle that
    would build any other object, e.g. one planted to run code, is refused without running."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        import re

        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        why = f"it would build {m.group(1)}" if m else type(e).__name__
        raise UserError(f"{path}: refused: not a tensors-only checkpoint file ({why}); it is damaged, was written "
                        "by an older negkd, or was tampered with. Pass --overwrite to start over") from None


def verify_checkpoint(ck: Path) -> None:
    """Load every file of a checkpoint the safe way (tensors only, headers checked) without applying it."""
    from negkd.validate import check_safetensors

    for f in sorted(Path(ck).glob("*.pt")):
        safe_torch_load(f)
    for f in sorted(Path(ck).rglob("*.safetensors")):
        check_safetensors(f)


def _sha(s: str) -> str:
    import hashlib

    return hashlib.sha256(s.encode()).hexdigest()[:16]


def _to_device(batch: dict, device) -> dict:
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _trim_metrics(path: Path, step: int) -> None:
    """Keep only records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a kill
    from negkd.io import atomic_write_text

    atomic_write_text(path, "".join(x + "\n" for x in keep))


def _save_checkpoint(out_dir: Path, step: int, acc, unwrapped, wrapped, optimizer, scheduler, fp: dict,
                     save_fn, extra: dict) -> None:
    root = Path(out_dir) / CHECKPOINTS
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    try:
        _write_checkpoint(root, final, tmp, step, acc, unwrapped, wrapped, optimizer, scheduler, fp, save_fn, extra)
    except BaseException:  # e.g. a full disk: leave no half-written .step-N.tmp behind
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_checkpoint(root: Path, final: Path, tmp: Path, step: int, acc, unwrapped, wrapped, optimizer, scheduler,
                      fp: dict, save_fn, extra: dict) -> None:
    import torch
    from safetensors.torch import save_file

    out_dir = root.parent
    if acc.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if _uses_sharded_state(acc):
        acc.save_state(str(tmp / "accelerate"))  # every process writes its shard
    state = acc.get_state_dict(wrapped) if _uses_sharded_state(acc) else None
    full = optim = None
    if _is_fsdp(acc):  # collectives: every process gathers
        from negkd import sharded

        full, optim = sharded.full_adapter_state(unwrapped), sharded.optimizer_state(unwrapped, optimizer)
    if acc.is_main_process:
        if full is not None:
            names = sharded.trainable_names(unwrapped)
            save_file({n: t for n, t in full.items() if n in names}, str(tmp / "trainable.safetensors"))
            torch.save(optim, tmp / "optimizer.pt")
        elif state is None:
            save_file(trainable_state(unwrapped), str(tmp / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if save_fn is not None:
            with (sharded.plain_adapters(unwrapped, full) if full is not None else nullcontext()):
                save_fn(unwrapped, tmp)
    torch.save(_rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "world_size": acc.num_processes, "fingerprint": fp, **extra}, indent=1,
            allow_nan=False) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out_dir)[:-1]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _load_checkpoint(ck: Path, acc, unwrapped, wrapped, optimizer, scheduler, rank: int) -> int:
    """Restore ``ck`` (already vetted by _resume_checkpoint); returns its step."""
    import torch

    from negkd.validate import load_safetensors

    st = read_json(ck / "trainer_state.json", dict, fix="the checkpoint is damaged: pass --overwrite to start over")
    if _uses_sharded_state(acc):
        acc.load_state(str(ck / "accelerate"))
    elif _is_fsdp(acc):
        from negkd import sharded

        sharded.load_trainable(unwrapped, load_safetensors(ck / "trainable.safetensors"))
        sharded.load_optimizer_state(unwrapped, optimizer, safe_torch_load(ck / "optimizer.pt"))
    else:
        sd = load_safetensors(ck / "trainable.safetensors")
        with torch.no_grad():
            for name, p in unwrapped.named_parameters():
                if p.requires_grad:
                    p.copy_(sd[name].to(p.device, p.dtype))
        optimizer.load_state_dict(safe_torch_load(ck / "optimizer.pt"))
    scheduler.load_state_dict(safe_torch_load(ck / "scheduler.pt"))
    rng = ck / f"rng_state_{rank}.pt"
    if rng.exists():
        _set_rng_state(safe_torch_load(rng))
    return int(st["step"])


# ---------------------------------------------------------------- run-dir helpers for training steps


def open_run(out: Path, command: str, args: dict, inputs: Sequence[Path], overwrite: bool, resume: bool,
             main: bool = True):
    """A RunDir for a training step, aware of --resume.

    Returns ``None`` when DIR already holds the same finished run (nothing to do). With
    ``--resume`` a finished run whose arguments differ only in the run length
    (``--max-steps``/``--epochs``) is reopened to be extended. ``--overwrite`` deletes
    earlier checkpoints and metrics (on the main process, ``main=True``, only).
    """
    from negkd.io import RunDir

    run = RunDir(out, command, args, inputs=inputs, overwrite=overwrite)
    prev = run.previous()
    if resume and prev is not None and prev.get("command") == command and not overwrite:
        pa, na = prev.get("args", {}), run.args
        changed = {k for k in set(pa) | set(na) if pa.get(k) != na.get(k)}
        same_inputs = [i["sha256"] for i in prev.get("inputs", [])] == [i["sha256"] for i in run.inputs]
        if changed and changed <= set(RUN_LENGTH_KEYS) and same_inputs:
            return run  # extend a finished run
    if run.up_to_date():
        return None
    if overwrite and main:
        run.lock()  # before deleting anything: a concurrent run in DIR is refused, not clobbered
        for name in (CHECKPOINTS, METRICS):
            p = Path(out) / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return run
