"""negkd.data: prompt/completion tokenization, labels, truncation accounting, collate, batching."""

import random

import pytest
import torch

from negkd.data import (IGNORE_INDEX, Collator, build_examples, length_grouped_batches, padding_share,
                        random_batches)
from negkd.prompts import DEFAULT_TEMPLATE


@pytest.fixture(scope="module")
def tok(tiny_model):
    from negkd.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model))


def _rec(i, q="What is 2 + 3?", r="2 + 3 = 5. The answer is $\\boxed{5}$."):
    return {"id": f"q{i}", "k": i, "question": q, "answer": "5", "rationale": r}


def test_prompt_and_completion_tokenized_separately_with_eos(tok):
    rec = _rec(0)
    (ex,), stats = build_examples([rec], tok, DEFAULT_TEMPLATE)
    p = tok(DEFAULT_TEMPLATE.format(question=rec["question"]))["input_ids"]
    c = tok(rec["rationale"], add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == p + c + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(p) + c + [tok.eos_token_id]
    assert ex["n_prompt"] == len(p) and ex["id"] == "q0" and ex["k"] == 0 and ex["idx"] == 0
    assert stats.kept == 1 and stats.truncated == 0
    assert stats.target_tokens == len(c) + 1


def test_loss_on_prompt_labels_everything(tok):
    (ex,), _ = build_examples([_rec(0)], tok, DEFAULT_TEMPLATE, loss_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_chat_template_wraps_prompt(tok):
    (ex,), _ = build_examples([_rec(0)], tok, DEFAULT_TEMPLATE, chat_template=True)
    prompt = tok.decode(ex["input_ids"][:ex["n_prompt"]])
    assert prompt.startswith("<|user|>") and prompt.rstrip().endswith("<|assistant|>")
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_truncation_counted_and_never_drops_completion(tok):
    long_r = " ".join(["7 + 8 = 15."] * 60)
    long_q = " ".join(["Ann has 3 apples."] * 60)
    recs = [_rec(0), _rec(1, r=long_r), _rec(2, q=long_q), _rec(3, r="   ")]
    exs, st = build_examples(recs, tok, DEFAULT_TEMPLATE, max_length=64)
    assert st.rows == 4 and st.kept == 3 and st.dropped_empty == 1 and st.dropped_ids == [["q3", 3]]
    assert st.completion_truncated == 1 and st.prompt_truncated == 1
    assert all(len(e["input_ids"]) <= 64 for e in exs)
    long_c, long_p = exs[1], exs[2]
    # completion cut from the right: no EOS at the end, prompt intact
    assert long_c["input_ids"][-1] != tok.eos_token_id and len(long_c["input_ids"]) == 64
    # prompt cut inside the question, from its left: the template's "Problem:" head and "Solution:"
    # cue both stay, and the whole (short) completion is kept with its EOS
    tail = tok.decode(long_p["input_ids"][:long_p["n_prompt"]])
    assert tail.startswith("Problem:\n") and tail.endswith("apples.\nSolution:\n") and st.prompt_frame_cut == 0
    c = tok(recs[2]["rationale"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert long_p["input_ids"][long_p["n_prompt"]:] == c
    assert "truncated 2 rows" in st.summary() and "dropped 1" in st.summary()


def test_collator_pads_dynamically_and_passes_extra_keys(tok):
    exs, _ = build_examples([_rec(0), _rec(1, r="5.")], tok, DEFAULT_TEMPLATE)
    b = Collator(tok.pad_token_id)(exs)
    L = max(len(e["input_ids"]) for e in exs)
    assert b["input_ids"].shape == (2, L) == b["labels"].shape == b["attention_mask"].shape
    n1 = len(exs[1]["input_ids"])
    assert (b["input_ids"][1, n1:] == tok.pad_token_id).all()
    assert (b["labels"][1, n1:] == IGNORE_INDEX).all() and (b["attention_mask"][1, n1:] == 0).all()
    assert b["attention_mask"][1, :n1].all()
    assert b["idx"].tolist() == [0, 1] and b["id"] == ["q0", "q1"] and b["k"] == [0, 1]
    assert Collator(tok.pad_token_id, pad_to_multiple_of=8)(exs)["input_ids"].shape[1] % 8 == 0


def test_length_grouped_batches_partition_and_low_padding():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5.5, 0.5)) for _ in range(2000)]  # rationale-like spread
    b0 = length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in b0 for i in b) == list(range(2000))
    assert all(len(b) <= 8 for b in b0)
    assert b0 == length_grouped_batches(lengths, 8, seed=1, epoch=0)  # deterministic
    assert b0 != length_grouped_batches(lengths, 8, seed=1, epoch=1)  # reshuffled each epoch
    assert max(lengths[i] for i in b0[0]) == max(lengths)  # the longest batch comes first
    grouped, plain = padding_share(b0, lengths), padding_share(random_batches(2000, 8, 1), lengths)
    assert grouped < 0.05 < 0.25 < plain


def test_collate_example_ids_are_tensors(tok):
    exs, _ = build_examples([_rec(0)], tok, DEFAULT_TEMPLATE)
    b = Collator(tok.pad_token_id)(exs)
    assert b["input_ids"].dtype == torch.long and b["idx"].dtype == torch.long


@pytest.fixture(scope="module")
def bos_tok(tiny_model):
    """The tiny tokenizer, made to prepend BOS like LLaMA's."""
    from tokenizers.processors import TemplateProcessing

    from negkd.modeling import load_tokenizer

    t = load_tokenizer(str(tiny_model))
    t._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.bos_token_id)])
    assert t("x")["input_ids"][0] == t.bos_token_id
    return t


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_truncation_keeps_bos_and_header_and_cuts_inside_the_question(bos_tok, chat):
    """A long question is cut from its left; BOS (plain) / the chat header (--chat-template) and the
    template text around {question} stay, and the kept tokens are exactly the full prompt's tokens."""
    from negkd.prompts import build_prompt

    long_q = " ".join(f"Ann has {i} apples." for i in range(80)) + " How many now?"
    rec = _rec(0, q=long_q)
    full, _ = build_examples([rec], bos_tok, DEFAULT_TEMPLATE, chat_template=chat, max_length=4096)
    exs, st = build_examples([rec], bos_tok, DEFAULT_TEMPLATE, chat_template=chat, max_length=64)
    (ex,) = exs
    assert st.prompt_truncated == 1 and st.prompt_frame_cut == 0 and len(ex["input_ids"]) == 64
    p, p_full = ex["input_ids"][:ex["n_prompt"]], full[0]["input_ids"][:full[0]["n_prompt"]]
    head = build_prompt({**rec, "question": ""}, DEFAULT_TEMPLATE, bos_tok, chat).split("Solution:")[0]
    n_head = len(bos_tok(head.rstrip("\n"), add_special_tokens=not chat)["input_ids"])
    assert p[:n_head] == p_full[:n_head]  # BOS / header / "Problem:" kept token for token
    text = bos_tok.decode(p)
    if chat:
        assert text.startswith("<|user|>\nProblem:\n") and text.endswith("</s>\n<|assistant|>\n")
    else:
        assert p[0] == bos_tok.bos_token_id and text.startswith("<s>Problem:\n")
        assert text.endswith("How many now?\nSolution:\n")
    k = next(i for i in range(len(p)) if p[i] != p_full[i])  # first cut position
    assert k >= n_head and p[k:] == p_full[len(p_full) - (len(p) - k):]  # one cut; the end is the full prompt's
    assert "Ann has 0 apples" not in text and "Ann has 79 apples. How many now?" in text
    assert ex["input_ids"][ex["n_prompt"]:] == full[0]["input_ids"][full[0]["n_prompt"]:]  # completion whole


def test_prompt_truncation_when_even_the_frame_does_not_fit_keeps_bos_and_is_counted(bos_tok):
    rec = _rec(0, q=" ".join(["Ann has 3 apples."] * 40), r=" ".join(["7 + 8 = 15."] * 40))
    tmpl = "Here is a problem for you to solve carefully, step by step:\n{question}\nNow write the solution:\n"
    (ex,), st = build_examples([rec], bos_tok, tmpl, max_length=16)
    assert st.prompt_truncated == 1 and st.prompt_frame_cut == 1 and "lost template text" in st.summary()
    assert len(ex["input_ids"]) == 16 and ex["input_ids"][0] == bos_tok.bos_token_id
    assert "Ann has" not in bos_tok.decode(ex["input_ids"][:ex["n_prompt"]])  # the question went first


def test_examples_carry_the_negative_flag(tok):
    exs, _ = build_examples([{**_rec(0), "correct": True}, {**_rec(1), "correct": False}, _rec(2)], tok,
                            DEFAULT_TEMPLATE)
    assert [e["neg"] for e in exs] == [False, True, False]
