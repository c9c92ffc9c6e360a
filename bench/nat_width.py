"""One adapted linear at 1,024 / 2,048 / 4,096 width: plain LoRA (PEFT) vs the NAT unit in its
old form (h_pos, h_neg, v_pos, v_neg materialised at the output width; kept here) vs the
memory-lean form ``negkd.nat.NATLinear`` computes — forward + backward time and the bytes the
autograd graph saves for backward, side by side, fp32 and bf16.

    python bench/nat_width.py                        # widths 1024,2048,4096, 512 tokens, 3 repeats
    python bench/nat_width.py --widths 4096 --dtypes bfloat16 --repeats 5

Set-up per width d: a frozen d x d ``nn.Linear`` in the dtype (no bias, as LLaMA's projections),
input (1, tokens, d) that requires grad (the layer sits inside a model: dx is computed), train
mode, dropout 0.05, LoRA r=8 (q/v-style: what PEFT computes: ``peft.get_peft_model``; adapter
weights float32 as PEFT keeps them), NAT r=8 both branches, d_g=128, all unit weights random
and non-zero. One step = forward, then backward of ``(y * R).sum()``. The variants run
interleaved (LoRA, old, new, LoRA, ...) and the median per variant is reported.

Saved bytes: every tensor the forward hands to autograd for backward (a
``torch.autograd.graph.saved_tensors_hooks`` pack hook), counted once per storage (a tensor
saved by two nodes is held once), parameters excluded (they exist anyway): the activations a
training step keeps per adapted layer, x (the layer input) included where the layer saves it.

Targets (issue 15) at 4,096 width: NAT (new) <= 1.3x LoRA time and <= 1.3x LoRA saved bytes.

Measured (2-core CPU, 1 thread, 3 repeats; saved bytes against LoRA with a CUDA-style bool mask),
4,096 width. float32, idle: at 512 tokens LoRA 431 ms / 10.0 MiB, old unit 1.48x / 5.77x, new
1.52x / 1.20x (forced h0-saved: 1.19x / 2.00x); at 2,048 tokens (a 2k-token row, or 4 x 512) LoRA
1,814 ms / 40 MiB, new 1.28x / 1.20x (h0 saved 1.24x / 2.00x). bfloat16, with the unit's output-wide
products in bfloat16 (a loaded machine: both rows shared it): at 512 tokens LoRA 274 ms, old 1.90x /
5.77x, new 1.19x / 1.29x; at 2,048 tokens new 1.19x / 1.21x (the h0-saved and W0 variants 1.04-1.08x).
Before that change (idle): bfloat16 new 1.52x at 512 tokens, 1.31x at 2,048.

The float32 time target cannot be met at 512 tokens with the bytes target also met, by arithmetic:
without a saved h0, W_1/W_K's gradient needs one pass of W0 over their 2 d_g rows, 2 d_g / tokens = 0.5
of a base matmul here, while LoRA's whole step is about two base matmuls (forward, dx), so the floor is
~1.25x before the unit's own work; saving h0 instead doubles the bytes. The pass shrinks with tokens
per micro-batch: at 2,048 tokens float32 meets both targets. Under a bfloat16 base h0 is saved (2
bytes) and no W0 pass runs. There the gap was the unit's output-wide matmuls (W_1/W_K over h0, W_2,
and their backward: ~2.4 GFLOP at 512 tokens against the base's 34) in float32, which this CPU runs
~3x slower per FLOP than bfloat16 (torch.profiler: matmul time 209 ms for LoRA vs 258 ms for NAT per
step). They now run in the base's dtype with float32 weights and gradients, as mixed precision does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from negkd import nat  # noqa: E402


class OldNAT(nat.NATLinear):
    """The unit as negkd computed it before issue 15: both branches at the output width."""

    def forward(self, x, *args, **kwargs):
        h0 = self.base_layer(x, *args, **kwargs)
        dt = self.lora_A_pos.weight.dtype
        xf, h0f = x.to(dt), h0.to(dt)  # (..., in), (..., out)
        xd = self.lora_dropout(xf)
        h_neg = h0f + self.neg_scale * self.lora_B_neg(self.lora_A_neg(xd))
        h_pos = h0f + self.pos_scale * self.lora_B_pos(self.lora_A_pos(xd))
        h = torch.stack((h_pos, h_neg))  # (2, ..., out)
        v = self.lora_gate_w2(F.gelu(self.lora_gate_w1(h)))  # (2, ..., out)
        k = self.lora_gate_k(h)  # (2, ..., d_g)
        q = self.lora_gate_q(xf)  # (..., d_g)
        scores = (k * q.unsqueeze(0)).sum(-1).float() / self.temperature
        a_neg = torch.softmax(scores, dim=0)[1]
        g_neg = (2 * self.beta * a_neg - self.beta).to(dt).unsqueeze(-1)
        return (h0f + (1 - g_neg) * v[0] + g_neg * v[1]).to(h0.dtype)


def build(kind: str, d: int, dtype: torch.dtype, r: int, gate_dim: int, dropout: float) -> nn.Module:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = nn.Linear(d, d, bias=False, dtype=dtype)
    holder.proj.weight.requires_grad_(False)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(holder, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["proj"],
                                              init_lora_weights=False))
        return m.train()
    cfg = nat.NATConfig(targets=["proj"], neg_r=r, neg_alpha=2.0 * r, pos_r=r, pos_alpha=2.0 * r, dropout=dropout,
                        gate_dim=gate_dim)
    holder.proj = (OldNAT if kind == "old" else nat.NATLinear)(holder.proj, cfg)
    with torch.no_grad():
        for n, p in holder.proj.named_parameters():
            if n.startswith("lora_"):
                p.normal_(0, 0.02)
    nat.mark_trainable(holder)
    return holder.train()


def step(model: nn.Module, x: torch.Tensor, R: torch.Tensor, p: float) -> tuple[float, int, int]:
    """(seconds for forward + backward, bytes saved for backward: unique storages, no parameters,
    the same with a float dropout mask counted at 1 byte per element as CUDA's bool mask)."""
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}
    seen: dict[int, tuple[int, int]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            b = st.nbytes()
            if t.is_floating_point() and t.numel() == x.numel() and p > 0 and \
                    bool(((t == 0) | (t == 1 / (1 - p))).all()):  # CPU dropout keeps its mask as floats
                seen[st.data_ptr()] = (b, t.numel())
            else:
                seen[st.data_ptr()] = (b, b)
        return t

    x.grad = None
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model.proj(x) if hasattr(model, "proj") else model(x)
    (y * R).sum().backward()
    dt = time.perf_counter() - t0
    for q in model.parameters():
        q.grad = None
    return dt, sum(b for b, _ in seen.values()), sum(c for _, c in seen.values())


VARIANTS = {"lora": ("lora", None), "old": ("old", None), "new": ("new", None),
            "new-h0": ("new", float("inf")), "new-W0": ("new", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="1024,2048,4096")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--gate-dim", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"one adapted d x d linear, {a.tokens} tokens, LoRA r={a.r}, NAT d_g={a.gate_dim}, dropout {a.dropout}, "
          f"{a.threads} thread(s), median of {a.repeats} interleaved repeats (forward + backward)")
    print("new: NATLinear as shipped; new-h0 / new-W0: its two ways of getting W_1/W_K's gradient forced "
          "(h0 saved / rebuilt through W0; half-precision bases always save h0)")
    print("MiB: saved for backward, CPU as measured; 'LoRA cuda' counts LoRA's dropout mask at 1 byte per "
          "element (CUDA keeps it as bool, CPU as floats); the x LoRA ratios are against 'LoRA cuda'")
    names = list(VARIANTS)
    head = " ".join(f"{n:>7s}" for n in names)
    print(f"{'dtype':9s} {'width':>5s} | ms: {head} | x LoRA: {' '.join(f'{n:>6s}' for n in names[1:])} | "
          f"MiB: {head} {'LoRA cuda':>9s} | x LoRA: {' '.join(f'{n:>6s}' for n in names[1:])}")
    for dname in a.dtypes.split(","):
        dtype = getattr(torch, dname)
        for d in (int(w) for w in a.widths.split(",")):
            models = {k: build(k, d, dtype, a.r, a.gate_dim, a.dropout) for k in ("lora", "old", "new")}
            g = torch.Generator().manual_seed(1)
            x = torch.randn(1, a.tokens, d, generator=g).to(dtype).requires_grad_(True)
            R = torch.randn(1, a.tokens, d, generator=g).to(dtype)
            times: dict[str, list[float]] = {k: [] for k in names}
            mem, mem_cuda = {}, {}
            for rep in range(a.repeats + 1):  # the first round warms up
                for k in names:
                    kind, lean = VARIANTS[k]
                    before = nat.LEAN_MIN_TOKENS
                    nat.LEAN_MIN_TOKENS = before if lean is None else lean
                    try:
                        t, b, c = step(models[kind], x, R, a.dropout)
                    finally:
                        nat.LEAN_MIN_TOKENS = before
                    if rep:
                        times[k].append(t)
                    mem[k], mem_cuda[k] = b / 2 ** 20, c / 2 ** 20
            t = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            lc, tl = mem_cuda["lora"], t["lora"]
            ms = " ".join(f"{t[n]:7.1f}" for n in names)
            tx = " ".join(f"{t[n] / tl:6.2f}" for n in names[1:])
            mb = " ".join(f"{mem[n]:7.1f}" for n in names)
            mx = " ".join(f"{mem[n] / lc:6.2f}" for n in names[1:])
            print(f"{dname:9s} {d:5d} | ms: {ms} | x LoRA: {tx} | MiB: {mb} {lc:9.1f} | x LoRA: {mx}", flush=True)
            del models
    print("targets at 4,096 width: new x LoRA <= 1.3 (time) and <= 1.3 (saved bytes)")


if __name__ == "__main__":
    main()
