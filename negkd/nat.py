"""NAT: the dual-LoRA layer with the integration unit (method.md §3, step 1.2).

Every adapted linear ``W0`` (in -> out) becomes a ``NATLinear``. For layer input ``x``::

    h0    = W0 x
    h_pos = h0 + s_pos * B_pos A_pos dropout(x)       # trainable (lora_A_pos, lora_B_pos)
    h_neg = h0 + s_neg * B_neg A_neg dropout(x)       # frozen, from the Neg-LoRA (lora_A_neg, lora_B_neg)
    q     = W_Q x                                     # lora_gate_q:  in  -> d_g
    k_i   = W_K h_i          i in {pos, neg}          # lora_gate_k:  out -> d_g
    v_i   = W_2 gelu(W_1 h_i)                         # lora_gate_w1: out -> d_g, lora_gate_w2: d_g -> out
    a     = softmax_i(q . k_i / T)                    # per token; T = temperature (1)
    g_neg = 2 beta a_neg - beta                       # in [-beta, beta]
    g_pos = 1 - g_neg                                 # in [1-beta, 1+beta]
    y     = h0 + g_pos v_pos + g_neg v_neg

Computed in a memory-lean form of the same function (``NATLinear._unit``): W_1, W_K are linear
and g_i is a per-token scalar, so with ``z_i = A_i dropout(x)`` (rank r) ``u_i = W_1 h0 + s_i
(W_1 B_i) z_i``, ``k_i = W_K h0 + s_i (W_K B_i) z_i`` and ``y = h0 + W_2 [g_pos gelu(u_pos) + g_neg
gelu(u_neg)]``: one W_2 pass, and nothing output-wide besides h0 and y. Backward keeps x and h0
in their own dtype and the bool dropout mask (a float32 ``nn.Linear`` base with enough tokens
rebuilds W_1/W_K's gradient through W0 instead of keeping h0; ``_OutProj``).

``s = alpha / r`` per branch. ``B_pos`` and ``W_2`` start at zero, so a fresh unit is a no-op
(``y = h0``). No biases in the unit (the equations have none). The adapter's weights are float32
and it returns the base layer's dtype; softmax is float32. Its rank- and d_g-wide math runs in
float32; the output-wide matmuls (W_1 and W_K over h0, W_2 back to the output width, and their
backward) run in the base's dtype when that is bfloat16/float16, as mixed-precision training does
(float32 weights and gradients, half-precision products): in float32 they cost a fifth of a LoRA
layer's step on a bfloat16 base (bench/nat_width.py).

Modes (``set_mode``), per layer, switchable at any time (e.g. between teacher passes):

- ``"nat"``       the full equation above (default);
- ``"neg-only"``  ``y = h_neg`` — exactly the Neg-LoRA model of step 1.1 (NCE's ``p_neg`` teacher);
- ``"pos-only"``  ``y = h0 + v_pos`` — the unit with the negative branch gated off (g_neg = 0, g_pos = 1);
- ``"off"``       ``y = h0`` — the base model alone.

API (other steps build on these names):

- ``NATLinear(base_layer, cfg)``: the layer (``base_layer`` is the wrapped ``nn.Linear`` or a
  bitsandbytes 4/8-bit linear); attributes ``mode``, parameters named ``lora_*``.
- ``NATConfig``: targets (canonical module names), neg/pos LoRA r/alpha, dropout, gate dim/beta/T.
- ``attach_new(model, neg_dir, ...) -> NATConfig``: wrap the Neg-LoRA adapter's target linears of an
  already-loaded base with fresh NAT layers, loading the frozen Neg-LoRA from ``neg_dir``
  (a PEFT LoRA directory, the output of ``negkd train-neg``). Used by ``train-pos``.
- ``attach(model, nat_dir, trainable=False) -> dict``: load a NAT checkpoint onto an already-loaded
  base (all NAT parameters frozen and its dropout off, so teacher passes are deterministic even in
  train mode; mode ``"nat"``); returns the checkpoint's metadata. To train a *student*
  LoRA on the same base (NCE), create the PEFT student first (``peft.get_peft_model``) and call
  ``attach`` after: NAT then wraps the base linear *inside* each PEFT LoRA layer, so the
  student keeps stock PEFT names (``save_pretrained`` writes a standard adapter, NAT tensors are
  not included) and ``with peft_model.disable_adapter():`` + ``set_mode`` selects the teacher.
  With both active the output is ``y_nat(x) + s_stu B_stu A_stu x``.
- ``set_mode(model, mode)`` / ``using_mode(model, mode)`` (context manager) / ``get_mode(model)``.
- ``nat_layers(model) -> {canonical name: NATLinear}``.
- ``mark_trainable(model)``: freeze everything but ``lora_A_pos``/``lora_B_pos``/``lora_gate_*``;
  ``trainable_names(model)`` lists them; ``neg_state(model)`` returns the Neg-LoRA tensors.
- ``gate_mask(model, attention_mask)`` (context manager): count only real tokens in the gate
  statistics; ``gate_means(model, reset=True) -> {"g_neg/<layer>": mean}`` (training diagnostics).
- ``save(model, dir, meta)``: ``nat_config.json`` + ``nat_model.safetensors`` (all ``lora_*`` tensors).
- ``load(dir, device="auto", dtype="auto", load_in_4bit=False, load_in_8bit=False, base_model=None)
  -> (model, tokenizer, meta)``: base + NAT, eval mode, mode ``"nat"``, ready for ``generate``;
  ``meta`` holds ``base_model``, ``template``, ``chat_template`` and the NAT config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from negkd.errors import UserError

MODES = ("nat", "neg-only", "pos-only", "off")
CONFIG_NAME = "nat_config.json"
WEIGHTS_NAME = "nat_model.safetensors"
FORMAT = "negkd-nat"
POS_PARAMS = ("lora_A_pos", "lora_B_pos")
GATE_PARAMS = ("lora_gate_q", "lora_gate_k", "lora_gate_w1", "lora_gate_w2")
NEG_PARAMS = ("lora_A_neg", "lora_B_neg")
LEAN_MIN_TOKENS = 2  # tokens per gate row from which h0 is not saved for backward (NATLinear._h0_source)


@dataclass
class NATConfig:
    targets: list[str] = field(default_factory=list)  # canonical module names, e.g. model.layers.0.self_attn.q_proj
    neg_r: int = 8
    neg_alpha: float = 16.0
    neg_rslora: bool = False
    pos_r: int = 8
    pos_alpha: float = 16.0
    dropout: float = 0.05
    gate_dim: int = 128
    beta: float = 0.5
    temperature: float = 1.0

    @property
    def neg_scale(self) -> float:
        return self.neg_alpha / (math.sqrt(self.neg_r) if self.neg_rslora else self.neg_r)

    @property
    def pos_scale(self) -> float:
        return self.pos_alpha / self.pos_r


class NATLinear(nn.Module):
    """A linear layer with a frozen Neg-LoRA, a Pos-LoRA and the integration unit (see module doc)."""

    def __init__(self, base_layer: nn.Module, cfg: NATConfig):
        super().__init__()
        self.base_layer = base_layer
        d_in, d_out = base_layer.in_features, base_layer.out_features
        self.in_features, self.out_features = d_in, d_out
        self.neg_scale, self.pos_scale = cfg.neg_scale, cfg.pos_scale
        self.beta, self.temperature = cfg.beta, cfg.temperature
        self.mode = "nat"
        self._cfg = cfg
        dev = _weight_device(base_layer)
        kw = dict(bias=False, device=dev, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_A_neg = nn.Linear(d_in, cfg.neg_r, **kw)
        self.lora_B_neg = nn.Linear(cfg.neg_r, d_out, **kw)
        self.lora_A_pos = nn.Linear(d_in, cfg.pos_r, **kw)
        self.lora_B_pos = nn.Linear(cfg.pos_r, d_out, **kw)
        self.lora_gate_q = nn.Linear(d_in, cfg.gate_dim, **kw)
        self.lora_gate_k = nn.Linear(d_out, cfg.gate_dim, **kw)
        self.lora_gate_w1 = nn.Linear(d_out, cfg.gate_dim, **kw)
        self.lora_gate_w2 = nn.Linear(cfg.gate_dim, d_out, **kw)
        nn.init.kaiming_uniform_(self.lora_A_pos.weight, a=math.sqrt(5))  # as PEFT's LoRA
        nn.init.zeros_(self.lora_B_pos.weight)
        nn.init.zeros_(self.lora_gate_w2.weight)  # fresh unit: v = 0, y = h0
        nn.init.zeros_(self.lora_B_neg.weight)  # overwritten by the Neg-LoRA checkpoint
        # gate statistics (training diagnostics; not parameters, not saved)
        self.track_gates = False
        self._gate_on = False  # inside gate_mask(): the step's own forward, not a checkpoint recompute
        self._gate_mask: torch.Tensor | None = None
        self._g_sum: torch.Tensor | None = None
        self._g_n: torch.Tensor | None = None

    # base-layer passthroughs some model code and PEFT read
    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r_neg={self.lora_A_neg.out_features}, "
                f"r_pos={self.lora_A_pos.out_features}, d_g={self.lora_gate_q.out_features}, beta={self.beta}, "
                f"mode={self.mode!r}")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h0 = self.base_layer(x, *args, **kwargs)  # (..., out) in the base dtype
        if self.mode == "off":
            return h0
        dt = self.lora_A_pos.weight.dtype
        if self.mode == "neg-only":  # h_neg written out: the Neg-LoRA's own computation, bit for bit
            xd = self.lora_dropout(x.to(dt))
            return (h0.to(dt) + self.neg_scale * self.lora_B_neg(self.lora_A_neg(xd))).to(h0.dtype)
        return self._unit(x, h0, dt).to(h0.dtype)

    def _unit(self, x: torch.Tensor, h0: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """Modes "nat" and "pos-only" in the memory-lean form (module doc): h_pos, h_neg, v_pos, v_neg
        are never formed. W_1, W_K are linear, so with z_i = A_i dropout(x) (rank r)::

            u_i = W_1 h_i = W_1 h0 + s_i (W_1 B_i) z_i          # (..., d_g)
            k_i = W_K h_i = W_K h0 + s_i (W_K B_i) z_i          # (..., d_g)
            y   = h0 + W_2 [g_pos gelu(u_pos) + g_neg gelu(u_neg)]   # one W_2 pass

        Only h0 and y are output-wide. Saved for backward: x and h0 in their own dtype, the dropout
        mask (bool), and d_g- or r-wide tensors (_InProj, _OutProj)."""
        nat_mode = self.mode == "nat"
        Ap, Bp, W1 = self.lora_A_pos.weight, self.lora_B_pos.weight, self.lora_gate_w1.weight
        dg, rp = W1.shape[0], Ap.shape[0]
        p = self._dropout_p()
        mask = self._dropout_mask(x, p) if p > 0 else None  # one mask, shared by both branches
        if nat_mode:
            An, Bn, WK = self.lora_A_neg.weight, self.lora_B_neg.weight, self.lora_gate_k.weight
            qz = _InProj.apply(x, mask, p, 1, self.lora_gate_q.weight, Ap, An)  # (..., d_g + r_pos + r_neg)
            q, z_p, z_n = qz.split([dg, rp, An.shape[0]], -1)
            uk0 = _OutProj.apply(h0, *self._h0_source(x, h0), W1, WK)  # (..., 2 d_g): [W_1 h0, W_K h0]
            uk_p = uk0 + F.linear(z_p, self.pos_scale * torch.cat((W1 @ Bp, WK @ Bp)))  # (..., 2 d_g)
            uk_n = uk0 + F.linear(z_n, self.neg_scale * torch.cat((W1 @ Bn, WK @ Bn)))
            u_p, k_p = uk_p.split(dg, -1)
            u_n, k_n = uk_n.split(dg, -1)
            scores = torch.stack(((k_p * q).sum(-1), (k_n * q).sum(-1))).float() / self.temperature  # (2, ...)
            a_neg = torch.softmax(scores, dim=0)[1]  # (...)
            g_neg = (2 * self.beta * a_neg - self.beta).to(dt).unsqueeze(-1)  # (..., 1) in [-beta, beta]
            mix = (1 - g_neg) * F.gelu(u_p) + g_neg * F.gelu(u_n)  # (..., d_g): g_pos gelu(u_pos) + g_neg gelu(u_neg)
            if self.track_gates and self._gate_on:  # a backward recompute runs outside the context: not counted twice
                self._record(g_neg.detach().squeeze(-1))
        else:  # pos-only: g_neg = 0, g_pos = 1
            z_p = _InProj.apply(x, mask, p, 0, Ap)  # (..., r_pos)
            u_p = _OutProj.apply(h0, *self._h0_source(x, h0), W1) + F.linear(z_p, self.pos_scale * (W1 @ Bp))  # (..., d_g)
            mix = F.gelu(u_p)
        if _half(h0.dtype):  # the output-wide W_2 product in the base's dtype (module doc)
            return h0 + F.linear(mix.to(h0.dtype), self.lora_gate_w2.weight.to(h0.dtype))  # (..., out)
        return h0.to(dt) + self.lora_gate_w2(mix)  # (..., out)

    def _h0_source(self, x: torch.Tensor, h0: torch.Tensor) -> tuple:
        """(x, W0, bias) when W_1/W_K's gradient should be rebuilt from x through W0 rather than from
        a saved h0 (see _OutProj), else (None, None, None). Rebuilt for a float32 ``nn.Linear`` base
        (h0 would cost 4 bytes per output element) when the step has at least ``LEAN_MIN_TOKENS``
        tokens per gate row: the extra pass costs 2 d_g / tokens of the base layer's own matmul.
        Saved otherwise: half-precision h0 costs 2 bytes per element, and quantized bases keep
        their weights packed."""
        base = self.base_layer
        if (type(base) is nn.Linear and h0.dtype == torch.float32 and torch.is_grad_enabled()
                and x.numel() // x.shape[-1] >= LEAN_MIN_TOKENS * 2 * self.lora_gate_w1.out_features):
            return x, base.weight, base.bias
        return None, None, None

    def _dropout_p(self) -> float:
        d = self.lora_dropout
        return float(d.p) if isinstance(d, nn.Dropout) and d.training else 0.0

    @staticmethod
    def _dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
        """Keep-mask of nn.Dropout(p), (..., in) bool; dropout(x) = x * mask / (1 - p)."""
        return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)

    def _record(self, g: torch.Tensor) -> None:  # g: (B, T) or (...)
        m = self._gate_mask
        if m is not None and m.shape == g.shape:
            m = m.to(g.device, g.dtype)
            s, n = (g * m).sum().double(), m.sum().double()
        else:
            s, n = g.sum().double(), torch.tensor(float(g.numel()), device=g.device, dtype=torch.float64)
        self._g_sum = s if self._g_sum is None else self._g_sum + s
        self._g_n = n if self._g_n is None else self._g_n + n


class _InProj(torch.autograd.Function):
    """``[x W_j^T for the first n_plain weights, dropout(x) W_j^T for the rest]`` concatenated on the
    last axis: (..., in) -> (..., sum of the weights' rows), computed in the weights' dtype.

    dropout(x) = x * mask / (1 - p) (mask None: no dropout). Saves ``x`` in its own dtype and the
    bool mask, never a float32 copy of x or the dropped-out x: both are rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, mask, p, n_plain, *ws):
        dt = ws[0].dtype
        xf = x.to(dt)  # (..., in)
        if mask is None:
            out = F.linear(xf, torch.cat(ws) if len(ws) > 1 else ws[0])
        else:
            xd = xf * mask * (1.0 / (1.0 - p))
            parts = ([F.linear(xf, torch.cat(ws[:n_plain]))] if n_plain else []) + [F.linear(xd, torch.cat(ws[n_plain:]))]
            out = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
        ctx.save_for_backward(x, mask, *ws)
        ctx.p, ctx.n_plain = p, n_plain
        return out

    @staticmethod
    def backward(ctx, g):
        x, mask, *ws = ctx.saved_tensors
        scale, n_plain = 1.0 / (1.0 - ctx.p), ctx.n_plain
        if mask is None:
            n_plain = len(ws)  # no dropout: every weight sees x itself
        xf = x.to(ws[0].dtype).reshape(-1, x.shape[-1])  # (N, in)
        g2 = g.reshape(-1, g.shape[-1])  # (N, rows)
        rows = [w.shape[0] for w in ws]
        n_rows = sum(rows[:n_plain])
        dws, start = [], 0
        xd = None
        for i, (w, r) in enumerate(zip(ws, rows)):
            if not ctx.needs_input_grad[4 + i]:
                dws.append(None)
            else:
                src = xf
                if i >= n_plain:
                    xd = xf * mask.reshape(-1, x.shape[-1]) * scale if xd is None else xd
                    src = xd
                dws.append(g2[:, start:start + r].t() @ src)  # (r, in)
            start += r
        dx = None
        if ctx.needs_input_grad[0]:
            if n_plain:
                dx = g2[:, :n_rows] @ torch.cat(ws[:n_plain])  # (N, in)
            if n_plain < len(ws):
                dd = g2[:, n_rows:] @ torch.cat(ws[n_plain:]) * mask.reshape(-1, x.shape[-1]) * scale
                dx = dd if dx is None else dx + dd
            dx = dx.reshape(x.shape).to(x.dtype)
        return (dx, None, None, None, *dws)


class _OutProj(torch.autograd.Function):
    """``h0 [W_1; W_K]^T``: (..., out) -> (..., sum of the weights' rows) in the weights' dtype.

    The weights' gradient is ``g^T h0``. Saved for it, either ``h0`` in its own dtype (the base's:
    bfloat16 under a bfloat16 base, never a float32 copy), or — when ``x`` and the base weight
    ``w0`` (out, in) are given — nothing output-wide: h0 = x w0^T + b, so
    ``g^T h0 = (g^T x) w0^T + (sum_t g) b^T``, one pass of w0 over the weights' rows (x is saved by
    _InProj anyway)."""

    @staticmethod
    def forward(ctx, h0, x, w0, b, *ws):
        if x is None:
            ctx.save_for_backward(h0, None, None, None, *ws)
        else:
            ctx.save_for_backward(None, x, w0, b, *ws)
        ctx.h0_dtype = h0.dtype
        w = torch.cat(ws) if len(ws) > 1 else ws[0]
        if _half(h0.dtype):  # half-precision base: the product in its dtype, the result in the weights' (module doc)
            return F.linear(h0, w.to(h0.dtype)).to(w.dtype)
        return F.linear(h0.to(w.dtype), w)

    @staticmethod
    def backward(ctx, g):
        h0, x, w0, b, *ws = ctx.saved_tensors
        dt = ws[0].dtype
        g2 = g.reshape(-1, g.shape[-1])  # (N, rows)
        if any(ctx.needs_input_grad[4:]):
            if x is None and _half(h0.dtype):
                dw = (g2.to(h0.dtype).t() @ h0.reshape(-1, h0.shape[-1])).to(dt)  # (rows, out)
            elif x is None:
                dw = g2.t() @ h0.to(dt).reshape(-1, h0.shape[-1])  # (rows, out)
            else:
                dw = F.linear(g2.t() @ x.to(dt).reshape(-1, x.shape[-1]), w0.to(dt))  # (rows, in) @ w0^T -> (rows, out)
                if b is not None:
                    dw = dw + g2.sum(0)[:, None] * b.to(dt)[None, :]
        dws, start = [], 0
        for i, w in enumerate(ws):
            r = w.shape[0]
            dws.append(dw[start:start + r] if ctx.needs_input_grad[4 + i] else None)
            start += r
        dh = None
        if ctx.needs_input_grad[0]:
            w = torch.cat(ws) if len(ws) > 1 else ws[0]
            dh = (g.to(ctx.h0_dtype) @ w.to(ctx.h0_dtype)) if _half(ctx.h0_dtype) else (g @ w).to(ctx.h0_dtype)
        return (dh, None, None, None, *dws)


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.bfloat16, torch.float16)


def _weight_device(layer: nn.Module) -> torch.device:
    w = getattr(layer, "weight", None)
    if w is not None:
        return w.device
    return next(layer.parameters()).device


# ---------------------------------------------------------------- module discovery


def canonical(name: str) -> str:
    """A module's name as in the plain base model: PEFT wrappers' prefixes and ``.base_layer`` dropped."""
    for pre in ("base_model.model.", "module."):
        if name.startswith(pre):
            name = name[len(pre):]
    return name.replace(".base_layer", "")


def nat_layers(model: nn.Module) -> dict[str, NATLinear]:
    return {canonical(n): m for n, m in model.named_modules() if isinstance(m, NATLinear)}


def _linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module, str]]:
    """(canonical name, module, parent, attribute) for every linear-like leaf not already in NAT."""
    for pname, parent in model.named_modules():
        if isinstance(parent, NATLinear):
            continue
        for attr, child in parent.named_children():
            if isinstance(child, NATLinear):
                continue
            if hasattr(child, "in_features") and hasattr(child, "out_features") and hasattr(child, "weight") \
                    and not any(True for _ in child.children()):
                full = f"{pname}.{attr}" if pname else attr
                yield canonical(full), child, parent, attr


def _wrap(model: nn.Module, cfg: NATConfig) -> dict[str, NATLinear]:
    want = set(cfg.targets)
    found: dict[str, NATLinear] = {}
    for name, child, parent, attr in list(_linear_modules(model)):
        if name in want and name not in found:
            layer = NATLinear(child, cfg)
            layer.train(child.training)  # follow the model's train/eval state
            setattr(parent, attr, layer)
            found[name] = layer
    missing = sorted(want - set(found))
    if missing:
        raise UserError(f"NAT target module(s) not found in the base model: {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}; is this the base the adapter was trained on?")
    return found


# ---------------------------------------------------------------- modes and trainability


def set_mode(model: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"NAT mode {mode!r}: expected one of {', '.join(MODES)}")
    layers = nat_layers(model)
    if not layers:
        raise ValueError("the model has no NAT layers; attach them with nat.attach / nat.attach_new")
    for m in layers.values():
        m.mode = mode


def get_mode(model: nn.Module) -> str:
    modes = {m.mode for m in nat_layers(model).values()}
    return modes.pop() if len(modes) == 1 else "mixed"


@contextmanager
def using_mode(model: nn.Module, mode: str, layers: list[NATLinear] | None = None):
    """The unit in ``mode`` inside the context, each layer's previous mode restored after. Pass
    ``layers`` (``list(nat_layers(model).values())``, found once) on a hot path to skip the module walk."""
    if mode not in MODES:
        raise ValueError(f"NAT mode {mode!r}: expected one of {', '.join(MODES)}")
    layers = list(nat_layers(model).values()) if layers is None else layers
    if not layers:
        raise ValueError("the model has no NAT layers; attach them with nat.attach / nat.attach_new")
    before = [m.mode for m in layers]
    for m in layers:
        m.mode = mode
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.mode = b


def mark_trainable(model: nn.Module) -> list[str]:
    """Freeze everything except the Pos-LoRA and the unit; return the trainable names."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in nat_layers(model).values():
        for attr in POS_PARAMS + GATE_PARAMS:
            getattr(m, attr).weight.requires_grad_(True)
    return trainable_names(model)


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def neg_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Neg-LoRA tensors by canonical name (clones, for before/after comparisons)."""
    out = {}
    for name, m in nat_layers(model).items():
        for attr in NEG_PARAMS:
            out[f"{name}.{attr}.weight"] = getattr(m, attr).weight.detach().clone()
    return out


# ---------------------------------------------------------------- gate statistics


@contextmanager
def gate_mask(model: nn.Module, attention_mask: torch.Tensor | None):
    """Record gate statistics (track_gates) only for forwards inside this context, counting only
    positions where ``attention_mask`` is 1 (None: all; train-pos passes the completion tokens, so
    the prompt and padding are not counted). Forwards outside it, such as gradient
    checkpointing's recompute during backward, are not counted."""
    layers = list(nat_layers(model).values())
    for m in layers:
        m._gate_mask, m._gate_on = attention_mask, True
    try:
        yield
    finally:
        for m in layers:
            m._gate_mask, m._gate_on = None, False


def track_gates(model: nn.Module, on: bool = True) -> None:
    for m in nat_layers(model).values():
        m.track_gates = on
        m._g_sum = m._g_n = None


def gate_means(model: nn.Module, reset: bool = True) -> dict[str, float]:
    """Mean g_neg per NAT layer since the last reset: ``{"g_neg/<layer>": mean}`` (layer names
    shortened: ``model.layers.3.self_attn.q_proj`` -> ``3.q_proj``)."""
    out = {}
    for name, m in nat_layers(model).items():
        if m._g_n is not None and float(m._g_n) > 0:
            out[f"g_neg/{short_name(name)}"] = float(m._g_sum / m._g_n)
        else:
            out[f"g_neg/{short_name(name)}"] = 0.0
        if reset:
            m._g_sum = m._g_n = None
    return out


def short_name(name: str) -> str:
    parts = name.split(".")
    nums = [p for p in parts if p.isdigit()]
    return f"{nums[-1]}.{parts[-1]}" if nums else parts[-1]


# ---------------------------------------------------------------- Neg-LoRA (PEFT adapter) reading


def read_neg_adapter(neg_dir: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """A PEFT LoRA directory -> (adapter_config, {canonical module: {"A": (r, in), "B": (out, r)}})."""
    from negkd.io import read_json
    from negkd.validate import load_safetensors

    neg_dir = Path(neg_dir)
    cfg_path = neg_dir / "adapter_config.json"
    if not neg_dir.is_dir():
        raise UserError(f"--neg {neg_dir}: no such directory; pass the output directory of `negkd train-neg`")
    if not cfg_path.exists():
        raise UserError(f"--neg {neg_dir}: not a LoRA adapter directory (no adapter_config.json); "
                        "create one with `negkd train-neg NEG -o DIR --base-model M`")
    acfg = read_json(cfg_path, dict, fix="rerun `negkd train-neg`")
    if acfg.get("peft_type") != "LORA":
        raise UserError(f"--neg {neg_dir}: a {acfg.get('peft_type')} adapter; NAT needs a LoRA adapter from `negkd train-neg`")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if acfg.get(key) == bad:
            raise UserError(f"--neg {neg_dir}: {key}={bad} adapters are not supported by NAT; retrain with `negkd train-neg`")
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise UserError(f"--neg {neg_dir}: per-module rank/alpha patterns are not supported by NAT")
    if acfg.get("bias", "none") != "none":
        raise UserError(f"--neg {neg_dir}: LoRA bias={acfg.get('bias')!r} is not supported by NAT (need bias='none')")
    wpath = neg_dir / "adapter_model.safetensors"
    if not wpath.exists():
        raise UserError(f"--neg {neg_dir}: adapter_model.safetensors is missing (an unfinished `negkd train-neg`?)")
    sd = load_safetensors(wpath)
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        for part, tag in ((".lora_A.", "A"), (".lora_B.", "B")):
            if part in key:
                mod = canonical(key.split(part)[0])
                mods.setdefault(mod, {})[tag] = t
    if not mods:
        raise UserError(f"--neg {neg_dir}: the adapter holds no LoRA tensors")
    for mod, ab in mods.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"--neg {neg_dir}: module {mod} lacks lora_A or lora_B")
    return acfg, mods


def attach_new(model: nn.Module, neg_dir: Path, pos_r: int = 8, pos_alpha: float = 16.0, dropout: float = 0.05,
               gate_dim: int = 128, beta: float = 0.5, temperature: float = 1.0) -> NATConfig:
    """Wrap the Neg-LoRA's target linears with fresh NAT layers (Neg-LoRA loaded, frozen)."""
    acfg, mods = read_neg_adapter(neg_dir)
    r = int(acfg.get("r", 8))
    cfg = NATConfig(targets=sorted(mods), neg_r=r, neg_alpha=float(acfg.get("lora_alpha", r)),
                    neg_rslora=bool(acfg.get("use_rslora", False)), pos_r=pos_r, pos_alpha=pos_alpha,
                    dropout=dropout, gate_dim=gate_dim, beta=beta, temperature=temperature)
    layers = _wrap(model, cfg)
    with torch.no_grad():
        for name, layer in layers.items():
            A, B = mods[name]["A"], mods[name]["B"]
            if tuple(A.shape) != tuple(layer.lora_A_neg.weight.shape) or tuple(B.shape) != tuple(layer.lora_B_neg.weight.shape):
                raise UserError(f"--neg {neg_dir}: {name} has LoRA shapes {tuple(A.shape)}/{tuple(B.shape)}, the base "
                                f"layer needs {tuple(layer.lora_A_neg.weight.shape)}/{tuple(layer.lora_B_neg.weight.shape)}; "
                                "the Neg-LoRA was trained on another base model")
            layer.lora_A_neg.weight.copy_(A)
            layer.lora_B_neg.weight.copy_(B)
    mark_trainable(model)
    return cfg


# ---------------------------------------------------------------- save / load


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All NAT tensors by canonical name: ``<module>.lora_*.weight``."""
    out = {}
    for name, m in nat_layers(model).items():
        for attr in NEG_PARAMS + POS_PARAMS + GATE_PARAMS:
            out[f"{name}.{attr}.weight"] = getattr(m, attr).weight.detach().to("cpu").contiguous()
    return out


def config_of(model: nn.Module) -> NATConfig:
    layers = nat_layers(model)
    if not layers:
        raise ValueError("the model has no NAT layers")
    cfg = next(iter(layers.values()))._cfg
    return NATConfig(**{**asdict(cfg), "targets": sorted(layers)})


def save(model: nn.Module, out: Path, cfg: NATConfig, meta: dict | None = None) -> None:
    """Write ``nat_config.json`` and ``nat_model.safetensors`` into ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(model), str(out / WEIGHTS_NAME), metadata={"format": FORMAT})
    doc = {"format": FORMAT, "version": 1, "nat": asdict(cfg), **(meta or {})}
    (out / CONFIG_NAME).write_text(json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")


def read_config(nat_dir: Path) -> dict:
    nat_dir = Path(nat_dir)
    p = nat_dir / CONFIG_NAME
    if not p.exists():
        raise UserError(f"{nat_dir}: not a NAT checkpoint (no {CONFIG_NAME}); create one with `negkd train-pos`")
    from negkd.io import read_json

    doc = read_json(p, dict, fix="rerun `negkd train-pos`")
    if doc.get("format") != FORMAT or not isinstance(doc.get("nat"), dict):
        raise UserError(f"{p}: not a negkd NAT config (format {doc.get('format')!r})")
    return doc


def attach(model: nn.Module, nat_dir: Path, trainable: bool = False) -> dict:
    """Load a NAT checkpoint onto an already-loaded base (see module doc); returns its metadata."""
    from negkd.validate import load_safetensors

    doc = read_config(nat_dir)
    cfg = NATConfig(**doc["nat"])
    layers = _wrap(model, cfg)
    sd = load_safetensors(Path(nat_dir) / WEIGHTS_NAME)
    with torch.no_grad():
        for name, layer in layers.items():
            for attr in NEG_PARAMS + POS_PARAMS + GATE_PARAMS:
                key = f"{name}.{attr}.weight"
                if key not in sd:
                    raise UserError(f"{nat_dir}: {WEIGHTS_NAME} lacks {key}; the checkpoint is incomplete")
                w = getattr(layer, attr).weight
                if sd[key].shape != w.shape:
                    raise UserError(f"{nat_dir}: {key} has shape {tuple(sd[key].shape)}, the base needs "
                                    f"{tuple(w.shape)}; load it onto the base model it was trained on")
                w.copy_(sd[key])
    for layer in layers.values():
        for attr in NEG_PARAMS + POS_PARAMS + GATE_PARAMS:
            getattr(layer, attr).weight.requires_grad_(False)
        if not trainable:  # a frozen teacher is deterministic, also while a student trains beside it
            layer.lora_dropout = nn.Identity()
    if trainable:
        for layer in layers.values():
            for attr in POS_PARAMS + GATE_PARAMS:
                getattr(layer, attr).weight.requires_grad_(True)
    set_mode(model, "nat")
    return doc


def resolve_base(recorded: dict, override: str | None = None) -> str:
    """The base model to load: an override, else the recorded absolute path if it still exists,
    else the name as given (a hub id or a path relative to the current directory)."""
    if override:
        return override
    path = recorded.get("base_model_path")
    if path and Path(path).is_dir():
        return path
    name = recorded.get("base_model")
    if not name:
        raise UserError("the checkpoint does not record its base model; pass base_model=")
    return name


def load(nat_dir: Path, device: str = "auto", dtype: str = "auto", load_in_4bit: bool = False,
         load_in_8bit: bool = False, base_model: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, meta): the base model with the NAT checkpoint attached, eval mode, mode "nat"."""
    from negkd.modeling import load_model, load_tokenizer

    nat_dir = Path(nat_dir)
    doc = read_config(nat_dir)
    base = resolve_base(doc, base_model)
    model = load_model(base, device=device, dtype=dtype, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                       trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    meta = attach(model, nat_dir)
    model.eval()
    tok_src = nat_dir if (nat_dir / "tokenizer_config.json").exists() else base
    tokenizer = load_tokenizer(str(tok_src), trust_remote_code=trust_remote_code)
    return model, tokenizer, meta
