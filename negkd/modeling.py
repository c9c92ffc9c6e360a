"""The only place negkd calls ``from_pretrained`` for base models: device, dtype, quantization.

``--device auto|cpu|cuda[:N]``, ``--dtype auto|float32|bfloat16|float16`` (auto = bf16 where
CUDA supports it, else fp32 — fp16 only on request), ``--load-in-4bit``/``--load-in-8bit``
through bitsandbytes (QLoRA; bitsandbytes >= 0.49 runs these on CPU too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from negkd.errors import UsageError, UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None


def resolve_dtype(dtype: str = "auto", device=None):
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        dev = device if device is not None else resolve_device("auto")
        if getattr(dev, "type", str(dev)) == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def check_model_dir(name) -> None:
    """Corrupt JSON or truncated safetensors in a local model directory: one line, before loading."""
    from negkd.validate import check_model_dir as check

    check(name)


def check_model_path(name: str) -> None:
    """A local-looking name must be a model directory with a config.json (a hub id passes)."""
    _check_exists(str(name))


def _check_exists(name: str) -> None:
    p = Path(name)
    looks_local = name.startswith((".", "/", "~")) or p.exists() or name.count("/") > 1
    if looks_local and not p.is_dir():
        raise UserError(f"{name}: no such model directory; pass a local Hugging Face model dir or a hub id "
                        "(create a tiny one with `negkd tiny-model -o DIR`)")
    if p.is_dir() and not (p / "config.json").exists():
        raise UserError(f"{name}: not a Hugging Face model directory (no config.json)")


def quiet_libraries() -> None:
    """Silence chatter not meant for negkd's users: transformers' weight-loading bars and
    bitsandbytes' notice about an optional CPU kernel package."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_tokenizer(name: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """Tokenizer with a pad token (falls back to EOS) and the requested padding side."""
    from transformers import AutoTokenizer

    quiet_libraries()

    if not (Path(name) / "tokenizer_config.json").is_file():  # adapter/NAT dirs ship a tokenizer, no config.json
        _check_exists(str(name))
    check_model_dir(name)
    try:
        tok = AutoTokenizer.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: cannot load tokenizer ({_first_line(e)})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"{name}: tokenizer has neither a pad nor an EOS token; negkd needs an EOS token")
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise UserError(f"{name}: tokenizer has no EOS token; negkd appends EOS to every completion")
    tok.padding_side = padding_side
    return tok


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype) -> Any:
    if load_in_4bit and load_in_8bit:
        raise UsageError("--load-in-4bit and --load-in-8bit are exclusive; pick one")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--load-in-4bit/--load-in-8bit need bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)
    return BitsAndBytesConfig(load_in_8bit=True)


def check_causal_lm(name: str, trust_remote_code: bool = False):
    """Fail early (before tokenizers and weights) unless ``name`` is a causal LM; returns its config."""
    from transformers import AutoConfig

    name = str(name)
    _check_exists(name)
    check_model_dir(name)
    try:
        cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: cannot load model config ({_first_line(e)})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise UserError(f"{name}: model type {cfg.model_type!r} is not a causal language model; "
                        "negkd needs a decoder (LLaMA, Qwen2, Mistral, GPT-NeoX, ...)")
    # bert, roberta, electra, bart, ... have a *ForCausalLM class too, but their checkpoints are
    # encoders (or encoder-decoders) unless the config says is_decoder
    if cfg.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(cfg, "is_decoder", False):
        what = "an encoder-decoder" if getattr(cfg, "is_encoder_decoder", False) else "an encoder"
        raise UserError(f"{name}: is {what} ({cfg.model_type}), not a causal LM; pass a decoder-only model "
                        "such as LLaMA/Qwen2/Mistral")
    return cfg


def load_model(name: str, device: str | Any = "auto", dtype: str = "auto", load_in_4bit: bool = False,
               load_in_8bit: bool = False, trust_remote_code: bool = False,
               gradient_checkpointing: bool = False):
    """Load a causal LM onto one device (each process of a distributed run loads its own copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    name = str(name)
    _check_exists(name)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_causal_lm(name, trust_remote_code)
    qcfg = quantization_config(load_in_4bit, load_in_8bit, torch_dtype)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": dev}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{name}: cannot load model ({_first_line(e)})") from None
    if qcfg is None:
        model.to(dev)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
