"""Checkpoints and payloads of a model sharded by FSDP2 (``accelerate launch`` with an FSDP config).

Under FSDP2 every parameter (frozen base and adapter alike) is a ``DTensor`` shard, so the plain
code paths fail: safetensors cannot write a shard, PEFT's ``save_pretrained`` and NAT's ``save``
read shards, and the optimizer state is sharded too. negkd's adapters are small, so instead of
accelerate's ``save_state`` (which also writes the whole frozen base at every checkpoint) this
module gathers only the *adapter* tensors — every trainable parameter and every ``lora_*`` one
(NAT's frozen Neg-LoRA included) — to full tensors, and writes the same checkpoint files as a
single-process run (``trainable.safetensors``, ``optimizer.pt`` keyed by parameter name).

Every function that gathers is a collective: all processes must call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def is_sharded(model) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def _is_adapter(name: str, p) -> bool:
    return p.requires_grad or "lora_" in name


def full_adapter_state(model) -> dict[str, Any]:
    """``{name: full float tensor on CPU}`` of the adapter parameters (collective under FSDP)."""
    out = {}
    for name, p in model.named_parameters():
        if _is_adapter(name, p):
            t = p.detach()
            out[name] = (t.full_tensor() if _is_dtensor(t) else t).to("cpu").contiguous()
    return out


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _owner(model, name: str):
    mod, _, leaf = name.rpartition(".")
    return (model.get_submodule(mod) if mod else model), leaf


def _swap_in(model, full: dict[str, Any]):
    """Make ``full``'s tensors the adapter parameters and turn FSDP's state-dict hooks off; returns the undo."""
    import torch

    swapped, hooks = [], []
    for m in model.modules():
        if m._state_dict_pre_hooks:
            hooks.append((m, m._state_dict_pre_hooks.copy()))
            m._state_dict_pre_hooks.clear()
    for name, t in full.items():
        mod, leaf = _owner(model, name)
        swapped.append((mod, leaf, mod._parameters[leaf]))
        mod._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)

    def undo() -> None:
        for mod, leaf, old in swapped:
            mod._parameters[leaf] = old
        for m, h in hooks:
            m._state_dict_pre_hooks.update(h)

    return undo


@contextmanager
def plain_adapters(model, full: dict[str, Any]) -> Iterator[None]:
    """For the duration, the adapter parameters are ``full``'s plain tensors and FSDP's state-dict
    hooks (which re-register the shards) are off, so a payload writer that reads the model
    (PEFT ``save_pretrained``, ``nat.save``) sees full tensors. Main process only; no collective."""
    undo = _swap_in(model, full)
    try:
        yield
    finally:
        undo()


def keep_plain_adapters(model, full: dict[str, Any]) -> None:
    """After training: leave the adapter parameters as full plain tensors for good (the model is
    then for saving and inspection, no longer for FSDP forward passes)."""
    _swap_in(model, full)


def optimizer_state(model, optimizer) -> dict:
    """The full optimizer state keyed by parameter name (collective; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Inverse of ``optimizer_state``; every process passes the full state (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def load_trainable(model, state: dict[str, Any]) -> None:
    """Copy full tensors into the (sharded) trainable parameters; every process passes all of them."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            src = state[name].to(p.dtype)
            if _is_dtensor(p):
                src = distribute_tensor(src.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            else:
                src = src.to(p.device)
            p.copy_(src)
