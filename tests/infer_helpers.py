"""Helpers shared by test_generation / test_infer / test_ranker: a random LoRA adapter on the
tiny model, a biased-EOS hook, and problem / graded-sample writers."""

from __future__ import annotations

import json
from pathlib import Path


def make_adapter(model_dir: Path, out: Path, seed: int = 1, template: str | None = None) -> Path:
    """A PEFT LoRA adapter with *random* A and B (so, unlike a fresh one, it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                     init_lora_weights=False, lora_dropout=0.0)
    pm = get_peft_model(base, cfg)
    with torch.no_grad():  # large enough that the adapter visibly changes greedy outputs
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(20.0)
    pm.save_pretrained(str(out))
    cfgf = out / "adapter_config.json"
    c = json.loads(cfgf.read_text())
    c["base_model_name_or_path"] = str(model_dir)
    cfgf.write_text(json.dumps(c))
    if template is not None:
        (out / "negkd.json").write_text(json.dumps({"base_model": str(model_dir), "template": template}))
    return out


def write_problems(path: Path, n: int, start: int = 0) -> Path:
    rows = [{"id": f"q{i}", "question": f"Ann has {i} apples and gets {i + 1} more. How many apples now?",
             "answer": str(2 * i + 1)} for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
