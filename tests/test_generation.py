"""negkd.generation: batched HF generation (left padding, n per prompt, EOS, memory bound, seeding)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from negkd.generation import Generation, _decode, _plan, generate, iter_generate  # noqa: E402

PROMPTS = [
    "Problem:\nAnn has 3 apples and gets 4 more. How many apples now?\nSolution:\n",
    "Problem:\nWhat is 2+2?\nSolution:\n",
    "Problem:\nBob has 10 pens, 7 cards and 12 coins; he gets 5 more pens. How many pens now?\nSolution:\n",
]


@pytest.fixture(scope="module")
def lm(tiny_model):
    from negkd.modeling import load_model, load_tokenizer

    return load_model(str(tiny_model), device="cpu", dtype="float32"), load_tokenizer(str(tiny_model))


class _CountingGenerate:
    """Wraps model.generate to record (rows, num_return_sequences) of every call."""

    def __init__(self, model):
        self.model, self.calls, self._orig = model, [], model.generate

    def __enter__(self):
        def gen(*a, **kw):
            self.calls.append((kw["input_ids"].shape[0], kw.get("num_return_sequences", 1)))
            return self._orig(*a, **kw)

        self.model.generate = gen
        return self

    def __exit__(self, *exc):
        del self.model.generate  # back to the class method


def test_shapes_tokens_and_order(lm):
    model, tok = lm
    out = generate(model, tok, PROMPTS, n=3, temperature=1.0, max_new_tokens=12, batch_size=4, seed=0)
    assert len(out) == len(PROMPTS) and all(len(g) == 3 for g in out)
    for gens in out:
        for g in gens:
            assert isinstance(g, Generation)
            assert 1 <= g.n_tokens <= 12
            assert g.finished or g.n_tokens == 12  # stopped by EOS or cut at the limit
    # input order is kept although calls are planned longest-first
    single = generate(model, tok, [PROMPTS[1]], greedy=True, max_new_tokens=12)
    batched = generate(model, tok, PROMPTS, greedy=True, max_new_tokens=12, batch_size=2)
    assert batched[1] == single[0]


def test_memory_bounded_by_batch_size(lm):
    model, tok = lm
    for n, bs in [(3, 4), (5, 2), (4, 8), (1, 1)]:
        with _CountingGenerate(model) as c:
            out = generate(model, tok, PROMPTS, n=n, max_new_tokens=4, batch_size=bs, seed=1)
        assert all(rows * k <= bs for rows, k in c.calls), (n, bs, c.calls)
        assert sum(rows * k for rows, k in c.calls) == n * len(PROMPTS)
        assert [len(g) for g in out] == [n] * len(PROMPTS)


def test_plan_splits_large_n_and_groups_small_n():
    assert _plan([5, 9, 7], n=5, batch_size=2) == [[(1, 2)], [(1, 2)], [(1, 1)], [(2, 2)], [(2, 2)], [(2, 1)],
                                                   [(0, 2)], [(0, 2)], [(0, 1)]]
    assert _plan([5, 9, 7], n=2, batch_size=4) == [[(1, 2), (2, 2)], [(0, 2)]]


def test_greedy_deterministic_and_batch_invariant(lm):
    model, tok = lm
    a = generate(model, tok, PROMPTS, greedy=True, max_new_tokens=16, batch_size=3, seed=0)
    b = generate(model, tok, PROMPTS, greedy=True, max_new_tokens=16, batch_size=1, seed=123)
    assert a == b  # left padding + attention mask: padding never changes the continuation
    with pytest.raises(ValueError):
        generate(model, tok, PROMPTS, n=2, greedy=True)


def test_sampling_seeded(lm):
    model, tok = lm
    kw = dict(n=4, temperature=1.0, top_p=0.95, max_new_tokens=16, batch_size=8)
    a = generate(model, tok, PROMPTS, seed=7, **kw)
    b = generate(model, tok, PROMPTS, seed=7, **kw)
    c = generate(model, tok, PROMPTS, seed=8, **kw)
    assert a == b
    assert a != c
    assert len({g.text for g in a[0]}) > 1  # n samples of one prompt differ


def test_stop_at_eos_and_padding_not_counted(lm):
    """Rows forced to emit EOS first end at once (empty text, 1 token); the others run on."""
    model, tok = lm
    eos = tok.eos_token_id
    step = {"i": 0}

    def hook(_mod, _inp, out):  # odd rows: EOS becomes certain at the 3rd generated token
        step["i"] += 1
        if step["i"] >= 3:
            out[1::2, -1, :] = -1e9
            out[1::2, -1, eos] = 1e9
        return out

    h = model.lm_head.register_forward_hook(hook)
    try:
        out = generate(model, tok, PROMPTS[:2], n=2, greedy=False, temperature=1.0, max_new_tokens=10,
                       batch_size=4, seed=0)
    finally:
        h.remove()
    gens = [g for gs in out for g in gs]
    finished = [g for g in gens if g.finished]
    assert finished and len(finished) < len(gens)
    assert all(g.n_tokens == 3 for g in finished)  # 2 tokens + the EOS; the padding after is not counted
    assert all(g.n_tokens == 10 and not g.finished for g in gens if not g.finished)


def test_decode_cuts_at_first_eos(lm):
    _, tok = lm
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a, b = tok("12", add_special_tokens=False)["input_ids"][:2]
    new = torch.tensor([[a, b, eos, pad, pad], [a, a, b, b, a], [eos, pad, pad, pad, pad]])
    g = _decode(tok, new, {eos})
    assert [x.n_tokens for x in g] == [3, 5, 1]
    assert [x.finished for x in g] == [True, False, True]
    assert g[0].text == tok.decode([a, b]) and g[2].text == ""


def test_iter_generate_streams_each_prompt_once(lm):
    model, tok = lm
    seen = []
    tokens = []
    for i, gens in iter_generate(model, tok, PROMPTS, n=3, max_new_tokens=6, batch_size=3, seed=0,
                                 on_tokens=lambda s, t: tokens.append((s, t))):
        assert len(gens) == 3
        seen.append(i)
    assert sorted(seen) == [0, 1, 2]
    assert sum(s for s, _ in tokens) == 9


def test_bad_arguments(lm):
    model, tok = lm
    for kw in (dict(n=0), dict(batch_size=0), dict(temperature=0.0), dict(top_p=0.0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            generate(model, tok, PROMPTS, **kw)
    assert generate(model, tok, [], n=2) == []


def test_peft_merged_and_unmerged_agree(lm, tiny_model, tmp_path):
    """Greedy and seeded sampling give the same text on a LoRA model merged or not (a harness
    once sampled garbage after merge_and_unload); and the adapter really changes the output."""
    from infer_helpers import make_adapter

    from negkd.modeling import load_model
    from negkd.steps.infer import load_adapter

    base_model, tok = lm
    ad = make_adapter(tiny_model, tmp_path / "adapter")
    unmerged = load_adapter(load_model(str(tiny_model), device="cpu", dtype="float32"), str(ad), merge=False)
    merged = load_adapter(load_model(str(tiny_model), device="cpu", dtype="float32"), str(ad), merge=True)
    assert type(merged).__name__ == "LlamaForCausalLM"  # really merged, not a PeftModel
    kw = dict(max_new_tokens=16, batch_size=4)
    g_base = generate(base_model, tok, PROMPTS, greedy=True, **kw)
    g_un = generate(unmerged, tok, PROMPTS, greedy=True, **kw)
    g_me = generate(merged, tok, PROMPTS, greedy=True, **kw)
    assert g_un == g_me
    assert g_un != g_base
    s_un = generate(unmerged, tok, PROMPTS, n=4, temperature=1.0, seed=3, **kw)
    s_me = generate(merged, tok, PROMPTS, n=4, temperature=1.0, seed=3, **kw)
    assert s_un == s_me


def test_stop_strings_end_rows_early(lm):
    import re as _re

    model, tok = lm
    kw = dict(n=1, temperature=1.0, max_new_tokens=32, seed=5)
    full = generate(model, tok, PROMPTS[:1], **kw)[0][0]
    m = _re.search(r"[A-Za-z]{3}", full.text[4:])  # an ASCII stop string the sample produces
    assert m, full.text
    stop = m.group(0)
    cut = generate(model, tok, PROMPTS[:1], stop=[stop], **kw)[0][0]
    assert cut.finished and cut.text == full.text[: full.text.find(stop)]
    assert cut.n_tokens < full.n_tokens  # generation really stopped there: no tokens spent past it
