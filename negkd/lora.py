"""PEFT LoRA helpers: attach a standard LoRA (QLoRA on quantized bases), check targets, save.

Adapters are stock PEFT directories (``adapter_config.json`` + ``adapter_model.safetensors``)
so ``peft.PeftModel.from_pretrained(base, DIR)``, vLLM and friends load them.
"""

from __future__ import annotations

from pathlib import Path

from negkd.errors import UserError


def linear_names(model) -> list[str]:
    """Distinct leaf names of linear-like modules (what --target-modules can name)."""
    names = set()
    for name, mod in model.named_modules():
        if hasattr(mod, "in_features") and hasattr(mod, "out_features") and not any(True for _ in mod.children()):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def matching_modules(model, targets: list[str] | str) -> list[str]:
    """Full names of the linear modules ``targets`` selects (PEFT's suffix rule); all-linear
    excludes the output head as PEFT does."""
    out = []
    head = None
    if targets == "all-linear":
        emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head = emb
    for name, mod in model.named_modules():
        if not (hasattr(mod, "in_features") and hasattr(mod, "out_features")) or any(True for _ in mod.children()):
            continue
        if targets == "all-linear":
            if mod is not head:
                out.append(name)
        elif any(name == t or name.endswith(f".{t}") for t in targets):
            out.append(name)
    return out


def check_targets(model, targets: list[str] | str) -> list[str]:
    mods = matching_modules(model, targets)
    if not mods:
        shown = targets if isinstance(targets, str) else ",".join(targets)
        raise UserError(f"--target-modules {shown}: matches no linear layer of this model; its linear layers are "
                        f"{', '.join(linear_names(model))} (or pass all-linear)")
    return mods


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_quantized", False))


def attach_lora(model, r: int, alpha: float, dropout: float, target_modules: list[str] | str,
                gradient_checkpointing: bool = False):
    """Wrap ``model`` in a fresh trainable PEFT LoRA (B = 0: a no-op until trained)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_targets(model, target_modules)
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none",
                     task_type="CAUSAL_LM")
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, cfg)
    except ValueError as e:
        raise UserError(f"--target-modules: {str(e).splitlines()[0]}") from None


def save_adapter(model, out: Path) -> None:
    """``save_pretrained`` of a PeftModel (only the adapter tensors)."""
    model.save_pretrained(str(out), safe_serialization=True)
