"""negkd.nat: the integration unit against method.md §3's equations, modes, trainability,
save/load, generation, and a student LoRA on the same base (the NCE set-up)."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from negkd import nat

TARGETS = ["q_proj", "v_proj"]


def _base(tiny_model):
    from negkd.modeling import load_model

    return load_model(str(tiny_model), device="cpu", dtype="float32").eval()


@pytest.fixture(scope="module")
def neg_dir(tiny_model, tmp_path_factory):
    """A Neg-LoRA as a stock PEFT adapter with non-zero weights (r=4, alpha=8)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    m = get_peft_model(_base(tiny_model), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                     init_lora_weights=False))
    d = tmp_path_factory.mktemp("neg") / "adapter"
    m.save_pretrained(str(d))
    return d


def _ids(tiny_model):
    from negkd.modeling import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    return tok(["Problem:\nWhat is 2 + 3?\nSolution:\n2 + 3 = 5."], return_tensors="pt")["input_ids"]


def _randomize(model, scale=0.3, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in nat.nat_layers(model).values():
            for attr in nat.POS_PARAMS + nat.GATE_PARAMS:
                w = getattr(layer, attr).weight
                w.copy_(torch.randn(w.shape, generator=g) * scale)


# ---------------------------------------------------------------- the unit vs the equations


def reference(x, W0, A_pos, B_pos, A_neg, B_neg, WQ, WK, W1, W2, s_pos, s_neg, beta, T):
    """method.md §3, written out term by term."""
    h0 = x @ W0.T
    h_pos = h0 + s_pos * (x @ A_pos.T) @ B_pos.T
    h_neg = h0 + s_neg * (x @ A_neg.T) @ B_neg.T
    q = x @ WQ.T
    k_pos, k_neg = h_pos @ WK.T, h_neg @ WK.T
    v_pos = F.gelu(h_pos @ W1.T) @ W2.T
    v_neg = F.gelu(h_neg @ W1.T) @ W2.T
    e_pos = torch.exp((q * k_pos).sum(-1, keepdim=True) / T)
    e_neg = torch.exp((q * k_neg).sum(-1, keepdim=True) / T)
    a_neg = e_neg / (e_pos + e_neg)
    g_neg = 2 * beta * a_neg - beta
    g_pos = 1 - g_neg
    return h0 + g_pos * v_pos + g_neg * v_neg, h0, v_pos, g_neg


def _layer(d_in=12, d_out=10, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = nat.NATConfig(targets=["proj"], neg_r=3, neg_alpha=6.0, pos_r=2, pos_alpha=5.0, dropout=0.0,
                        gate_dim=6, beta=kw.get("beta", 0.5), temperature=kw.get("T", 1.0))
    holder = nn.Module()
    holder.proj = nn.Linear(d_in, d_out, bias=False)
    holder.proj = nat.NATLinear(holder.proj, cfg)
    with torch.no_grad():
        for p in holder.proj.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    nat.mark_trainable(holder)
    return holder, holder.proj


@pytest.mark.parametrize("beta,T", [(0.5, 1.0), (0.3, 2.0)])
def test_unit_matches_equations_forward_and_backward(beta, T):
    _, L = _layer(beta=beta, T=T)
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = L(x)
    names = ["base_layer", "lora_A_pos", "lora_B_pos", "lora_A_neg", "lora_B_neg", "lora_gate_q", "lora_gate_k",
             "lora_gate_w1", "lora_gate_w2"]
    ws = [getattr(L, n).weight.detach().clone().requires_grad_(True) for n in names]
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, *_ = reference(x2, *ws, L.pos_scale, L.neg_scale, beta, T)
    assert L.pos_scale == 2.5 and L.neg_scale == 2.0
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    R = torch.randn_like(y)
    (y * R).sum().backward()
    (y_ref * R).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for n, w in zip(names, ws):
        p = getattr(L, n).weight
        if n in ("base_layer", "lora_A_neg", "lora_B_neg"):
            assert p.grad is None  # frozen
        else:
            torch.testing.assert_close(p.grad, w.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_modes_follow_their_definitions():
    _, L = _layer()
    x = torch.randn(3, 12)
    ws = [getattr(L, n).weight.detach() for n in ["base_layer", "lora_A_pos", "lora_B_pos", "lora_A_neg",
                                                  "lora_B_neg", "lora_gate_q", "lora_gate_k", "lora_gate_w1",
                                                  "lora_gate_w2"]]
    _, h0, v_pos, _ = reference(x, *ws, L.pos_scale, L.neg_scale, 0.5, 1.0)
    with torch.no_grad():
        L.mode = "off"
        torch.testing.assert_close(L(x), h0)
        L.mode = "neg-only"
        torch.testing.assert_close(L(x), h0 + L.neg_scale * x @ ws[3].T @ ws[4].T)
        L.mode = "pos-only"
        torch.testing.assert_close(L(x), h0 + v_pos)


def test_gate_stays_within_beta_even_when_saturated():
    _, L = _layer(beta=0.5)
    seen = []
    L.track_gates = True
    L._record = seen.append
    with torch.no_grad(), nat.gate_mask(L, None):
        L.lora_gate_q.weight.mul_(50)
        L.lora_gate_k.weight.mul_(50)
        L(torch.randn(4, 64, 12) * 5)
    g = seen[0]
    assert g.min() >= -0.5 and g.max() <= 0.5
    assert g.min() < -0.49 and g.max() > 0.49  # both ends reached: the bound is what holds it


def test_gate_stats_ignore_the_checkpoint_recompute():
    """Under gradient checkpointing backward reruns the forward outside gate_mask(): not counted."""
    from torch.utils.checkpoint import checkpoint

    holder, L = _layer()
    nat.track_gates(holder, True)
    x = torch.randn(2, 5, 12, requires_grad=True)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    with nat.gate_mask(holder, mask):
        y = checkpoint(lambda t: L(t).sin(), x, use_reentrant=False)  # sin: the recompute must reach L's end
    y.sum().backward()  # recomputes L's forward with no mask set
    assert x.grad is not None and float(L._g_n) == 8.0
    with torch.no_grad():
        L(x)  # outside the context: no statistics either
    assert float(L._g_n) == 8.0


def test_fresh_unit_is_a_no_op(tiny_model, neg_dir):
    ids = _ids(tiny_model)
    base = _base(tiny_model)
    with torch.no_grad():
        before = base(ids).logits
        cfg = nat.attach_new(base, neg_dir, gate_dim=16)
        base.eval()
        after = base(ids).logits
    assert cfg.neg_r == 4 and cfg.neg_scale == 2.0 and len(cfg.targets) == 4
    assert torch.equal(before, after)


def test_exactly_pos_and_gate_parameters_train(tiny_model, neg_dir):
    model = _base(tiny_model)
    nat.attach_new(model, neg_dir, gate_dim=16)
    expect = {f"model.layers.{i}.self_attn.{p}.{a}.weight" for i in (0, 1) for p in TARGETS
              for a in ("lora_A_pos", "lora_B_pos", "lora_gate_q", "lora_gate_k", "lora_gate_w1", "lora_gate_w2")}
    assert set(nat.trainable_names(model)) == expect
    layer = nat.nat_layers(model)["model.layers.0.self_attn.q_proj"]
    assert float(layer.lora_B_pos.weight.abs().sum()) == 0 and float(layer.lora_gate_w2.weight.abs().sum()) == 0


def test_neg_only_equals_the_peft_neg_adapter(tiny_model, neg_dir):
    from peft import PeftModel

    ids = _ids(tiny_model)
    model = _base(tiny_model)
    nat.attach_new(model, neg_dir, gate_dim=16)
    _randomize(model)
    ref = PeftModel.from_pretrained(_base(tiny_model), str(neg_dir)).eval()
    with torch.no_grad():
        nat.set_mode(model, "neg-only")
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        with ref.disable_adapter():
            base_logits = ref(ids).logits
        with nat.using_mode(model, "off"):
            assert torch.equal(model(ids).logits, base_logits)
        assert nat.get_mode(model) == "neg-only"
        nat.set_mode(model, "nat")
        assert not torch.allclose(model(ids).logits, base_logits, atol=1e-3)


@pytest.fixture(scope="module")
def nat_ckpt(tiny_model, neg_dir, tmp_path_factory):
    from negkd.modeling import load_tokenizer

    model = _base(tiny_model)
    cfg = nat.attach_new(model, neg_dir, gate_dim=16)
    _randomize(model)
    d = tmp_path_factory.mktemp("nat") / "ckpt"
    nat.save(model, d, cfg, meta={"base_model": str(tiny_model), "base_model_path": str(tiny_model),
                                  "template": "Q: {question}\nA: ", "chat_template": False})
    load_tokenizer(str(tiny_model)).save_pretrained(str(d))
    return d, model.eval()


def test_save_load_reproduces_logits_and_generation(tiny_model, nat_ckpt):
    d, model = nat_ckpt
    ids = _ids(tiny_model)
    loaded, tok, meta = nat.load(d, device="cpu")
    assert meta["template"] == "Q: {question}\nA: " and meta["chat_template"] is False
    assert meta["nat"]["gate_dim"] == 16 and not loaded.training
    assert nat.trainable_names(loaded) == []
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        g1 = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        g2 = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert g1.shape == (1, ids.shape[1] + 6) and torch.equal(g1, g2)
    doc = json.loads((d / nat.CONFIG_NAME).read_text())
    assert doc["format"] == "negkd-nat" and doc["base_model"] == str(tiny_model)


def test_student_lora_beside_nat_on_one_base(tiny_model, nat_ckpt, tmp_path):
    """The NCE set-up: a PEFT student first, NAT attached after; teacher = adapter disabled."""
    from peft import LoraConfig, PeftModel, get_peft_model

    d, nat_model = nat_ckpt
    ids = _ids(tiny_model)
    torch.manual_seed(3)
    student = get_peft_model(_base(tiny_model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj"],
                                                           init_lora_weights=False))
    nat.attach(student, d)
    student.eval()
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in nat.trainable_names(student))
    with torch.no_grad():
        with student.disable_adapter():
            torch.testing.assert_close(student(ids).logits, nat_model(ids).logits, rtol=1e-5, atol=1e-6)
            with nat.using_mode(student, "neg-only"):
                nat.set_mode(nat_model, "neg-only")
                torch.testing.assert_close(student(ids).logits, nat_model(ids).logits, rtol=1e-5, atol=1e-6)
                nat.set_mode(nat_model, "nat")
        nat.set_mode(student, "off")
        stu_logits = student(ids).logits
    student.save_pretrained(str(tmp_path / "stu"))
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "stu" / "adapter_model.safetensors")))
    assert keys and not any("_neg" in k or "_pos" in k or "gate" in k or "base_layer" in k for k in keys)
    plain = PeftModel.from_pretrained(_base(tiny_model), str(tmp_path / "stu")).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, stu_logits, rtol=1e-5, atol=1e-6)


def test_gate_means_respect_the_mask(tiny_model, nat_ckpt):
    d, model = nat_ckpt
    ids = torch.cat([_ids(tiny_model), _ids(tiny_model)])
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    nat.track_gates(model, True)
    with torch.no_grad(), nat.gate_mask(model, mask):
        model(ids, attention_mask=mask)
    means = nat.gate_means(model)
    nat.track_gates(model, False)
    assert set(means) == {f"g_neg/{i}.{p}" for i in (0, 1) for p in TARGETS}
    assert all(-0.5 <= v <= 0.5 for v in means.values()) and any(v != 0 for v in means.values())


def test_bad_neg_dirs(tmp_path, tiny_model):
    from negkd.errors import UserError

    with pytest.raises(UserError, match="no such directory"):
        nat.read_neg_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="negkd train-neg"):
        nat.read_neg_adapter(tmp_path / "empty")
    with pytest.raises(ValueError, match="mode"):
        nat.set_mode(_base(tiny_model), "sideways")


# ---------------------------------------------------------------- the memory-lean unit vs the plain equation


def _plain_unit(L, x, mask, mode):
    """The unit as method.md §3 writes it (h_pos, h_neg, v_i at the output width), from L's own
    tensors, with dropout(x) = x * mask / (1 - p): the reference for NATLinear's lean form."""
    w = {n: getattr(L, n).weight for n in ("lora_A_pos", "lora_B_pos", "lora_A_neg", "lora_B_neg", "lora_gate_q",
                                           "lora_gate_k", "lora_gate_w1", "lora_gate_w2")}
    h0 = L.base_layer(x)
    if mode == "off":
        return h0
    p = L._dropout_p()
    xd = x if mask is None else x * mask * (1.0 / (1 - p))
    h_pos = h0 + L.pos_scale * (xd @ w["lora_A_pos"].T) @ w["lora_B_pos"].T
    h_neg = h0 + L.neg_scale * (xd @ w["lora_A_neg"].T) @ w["lora_B_neg"].T
    v_pos = F.gelu(h_pos @ w["lora_gate_w1"].T) @ w["lora_gate_w2"].T
    if mode == "neg-only":
        return h_neg
    if mode == "pos-only":
        return h0 + v_pos
    v_neg = F.gelu(h_neg @ w["lora_gate_w1"].T) @ w["lora_gate_w2"].T
    q = x @ w["lora_gate_q"].T
    s = torch.stack(((q * (h_pos @ w["lora_gate_k"].T)).sum(-1), (q * (h_neg @ w["lora_gate_k"].T)).sum(-1)))
    a_neg = torch.softmax(s / L.temperature, 0)[1].unsqueeze(-1)
    g_neg = 2 * L.beta * a_neg - L.beta
    return h0 + (1 - g_neg) * v_pos + g_neg * v_neg


def _lean_layer(d_in=20, d_out=14, bias=False, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = nat.NATConfig(targets=["proj"], neg_r=3, neg_alpha=6.0, pos_r=2, pos_alpha=5.0, dropout=dropout,
                        gate_dim=6, beta=0.4, temperature=1.5)
    holder = nn.Module()
    holder.proj = nat.NATLinear(nn.Linear(d_in, d_out, bias=bias), cfg)
    with torch.no_grad():
        for p in holder.proj.parameters():  # B_pos and W_2 too: a fresh unit has them zero
            p.copy_(torch.randn(p.shape) * 0.5)
    nat.mark_trainable(holder)
    return holder.train(), holder.proj


@pytest.mark.parametrize("mode", nat.MODES)
@pytest.mark.parametrize("lean", [0, float("inf")], ids=["h0-rebuilt", "h0-saved"])
@pytest.mark.parametrize("dropout,bias", [(0.0, False), (0.3, True)])
def test_lean_unit_equals_the_plain_equation(mode, lean, dropout, bias, monkeypatch):
    """Forward and the gradient of x and of every trainable tensor, non-square (20 -> 14), every
    mode, both ways of getting W_1/W_K's gradient, with and without dropout (mask captured)."""
    monkeypatch.setattr(nat, "LEAN_MIN_TOKENS", lean)
    _, L = _lean_layer(bias=bias, dropout=dropout)
    L.mode = mode
    masks = []
    make = L._dropout_mask
    monkeypatch.setattr(L, "_dropout_mask", lambda x, p: masks.append(make(x, p)) or masks[-1])
    x = torch.randn(3, 7, 20, requires_grad=True)
    torch.manual_seed(5)
    y = L(x)
    if mode == "neg-only" and dropout:  # the exact Neg-LoRA path draws its mask inside nn.Dropout: same seed
        torch.manual_seed(5)
        masks.append(nn.functional.dropout(torch.ones_like(x), dropout) != 0)
    trainable = [p for p in L.parameters() if p.requires_grad]
    R = torch.randn_like(y)
    grads = torch.autograd.grad((y * R).sum(), [x, *trainable], allow_unused=True)
    mask = masks[0] if dropout and mode != "off" else None
    assert (mask is not None) == (dropout > 0 and mode != "off") and (mask is None or not bool(mask.all()))
    ref = _plain_unit(L, x, mask, mode)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    ref_grads = torch.autograd.grad((ref * R).sum(), [x, *trainable], allow_unused=True)
    for n, g, r in zip(["x"] + [n for n, p in L.named_parameters() if p.requires_grad], grads, ref_grads):
        if r is None:
            assert g is None or float(g.abs().max()) == 0, n
        else:
            # float32 rounding relative to the gradient's scale (|dx| reaches ~1e2 with these weights)
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()), msg=n)


def _saved(fn):
    out = []

    def pack(t):
        out.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, out


@pytest.mark.parametrize("dtype,lean", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, float("inf"))])
def test_lean_unit_saves_nothing_output_wide_in_float32(dtype, lean, monkeypatch):
    """What the lean form keeps for backward: x in its own dtype, the bool dropout mask, h0 only
    in the base's dtype (or not at all for a float32 nn.Linear with enough tokens), the rest
    d_g- or r-wide; never a float32 copy of an input- or output-wide tensor (the old unit kept 8)."""
    monkeypatch.setattr(nat, "LEAN_MIN_TOKENS", lean)
    holder, L = _lean_layer(d_in=40, d_out=48, dropout=0.1)
    holder.proj.base_layer.to(dtype)
    x = torch.randn(2, 16, 40, dtype=dtype, requires_grad=True)
    y, saved = _saved(lambda: L(x))
    params = {p.untyped_storage().data_ptr() for p in L.parameters()}
    wide = [t for t in saved if t.untyped_storage().data_ptr() not in params and t.shape[-1] in (40, 48)]
    kinds = sorted({(t.shape[-1], t.dtype) for t in wide}, key=str)
    if lean == 0 and dtype == torch.float32:
        assert kinds == sorted({(40, torch.float32), (40, torch.bool)}, key=str)
        assert all(t is x or t.dtype == torch.bool for t in wide)
    else:
        assert kinds == sorted({(40, dtype), (40, torch.bool), (48, dtype)}, key=str)
    y.float().sum().backward()
    assert L.lora_gate_w1.weight.grad is not None and x.grad.dtype == dtype


def test_lean_unit_under_gradient_checkpointing_matches_plain_backward():
    """Non-reentrant checkpointing recomputes the forward (same dropout mask: RNG state restored)."""
    from torch.utils.checkpoint import checkpoint

    _, L = _lean_layer(dropout=0.3)
    x = torch.randn(2, 9, 20, requires_grad=True)
    params = [p for p in L.parameters() if p.requires_grad]
    torch.manual_seed(7)
    g1 = torch.autograd.grad(L(x).pow(2).sum(), [x, *params])
    torch.manual_seed(7)
    g2 = torch.autograd.grad(checkpoint(L, x, use_reentrant=False).pow(2).sum(), [x, *params])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_lean_unit_on_a_4bit_base_matches_its_dequantized_weight():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False)
    q = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q = q.to("cpu")
    try:
        deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    except Exception as e:  # pragma: no cover - a bitsandbytes build without CPU 4-bit support
        pytest.skip(f"bitsandbytes 4-bit does not run on this CPU: {e}")
    cfg = nat.NATConfig(targets=["proj"], neg_r=2, pos_r=2, dropout=0.0, gate_dim=8)
    L = nat.NATLinear(q, cfg)
    with torch.no_grad():
        for n, p in L.named_parameters():
            if n.startswith("lora_"):
                p.copy_(torch.randn(p.shape) * 0.3)
    for n, p in L.named_parameters():
        p.requires_grad_(n.startswith(("lora_A_pos", "lora_B_pos", "lora_gate")))
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = L(x)
    assert nat.NATLinear._h0_source(L, x, y) == (None, None, None)  # quantized: h0 saved, weights stay packed
    ref_layer = nat.NATLinear(nn.Linear(64, 48, bias=False), cfg)
    ref_layer.load_state_dict({k: v for k, v in L.state_dict().items() if k.startswith("lora_")}, strict=False)
    ref_layer.base_layer.weight.data.copy_(deq)
    ref = _plain_unit(ref_layer, x, None, "nat")
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    R = torch.randn_like(y)
    g = torch.autograd.grad((y * R).sum(), [x, L.lora_gate_w1.weight, L.lora_A_pos.weight])
    r = torch.autograd.grad((ref * R).sum(), [x, ref_layer.lora_gate_w1.weight, ref_layer.lora_A_pos.weight])
    for a, b in zip(g, r):  # bitsandbytes' own backward for dx rounds differently: tolerance on the scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


@pytest.mark.parametrize("mode", ["nat", "pos-only"])
def test_half_precision_base_computes_output_wide_products_in_its_dtype(mode, monkeypatch):
    """Under a bfloat16 base the unit's output-wide matmuls run in bfloat16 (mixed precision): the
    output and every float32 weight gradient match the float32 equation to bfloat16 rounding, and
    the gradients stay float32."""
    _, L = _lean_layer(d_in=64, d_out=48)
    L.mode = mode
    with torch.no_grad():  # gate scores of order 1, not saturated: q and k get real gradients
        L.lora_gate_q.weight.mul_(0.05)
        L.lora_gate_k.weight.mul_(0.05)
    x32 = torch.randn(2, 16, 64, requires_grad=True)
    trainable = [p for p in L.parameters() if p.requires_grad]
    R = torch.randn(2, 16, 48)
    ref = _plain_unit(L, x32, None, mode)
    ref_g = torch.autograd.grad((ref * R).sum(), trainable, allow_unused=True)
    calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(nat.F, "linear", lambda a, w, *r: calls.append((a.shape[-1], w.shape[0], a.dtype)) or
                        real(a, w, *r))
    L.base_layer.to(torch.bfloat16)
    x = x32.detach().to(torch.bfloat16).requires_grad_()
    y = L(x)
    assert y.dtype == torch.bfloat16
    assert (48, 2 * 6 if mode == "nat" else 6, torch.bfloat16) in calls  # W_1 (and W_K) over h0 in bf16
    assert (6, 48, torch.bfloat16) in calls  # W_2 back to the output width in bf16
    g = torch.autograd.grad((y.float() * R).sum(), trainable, allow_unused=True)
    torch.testing.assert_close(y.float(), ref.detach(), rtol=0, atol=0.03 * float(ref.detach().abs().max()))
    for a, b in zip(g, ref_g):
        if b is None:  # pos-only: the gate's q and k are not used
            assert a is None or float(a.abs().max()) == 0
            continue
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0.03 * float(b.abs().max()))
