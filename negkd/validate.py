"""Checks of what a command is given, done before any model loads (fail fast, one line each).

- ``check_safetensors(path)``: the header of a ``.safetensors`` file parses and the file is as
  long as the header says (a truncated or corrupt file is refused before ``from_pretrained``).
- ``check_model_dir(path)``: every ``*.safetensors`` file of a model/adapter/NAT/ranker
  directory passes ``check_safetensors``, and the JSON configs parse to objects.
- ``load_safetensors(path)``: ``safetensors.torch.load_file`` whose errors name the file.
- ``scalar_text(value, field, where)``: a JSON string or number as text (``3`` -> ``"3"``);
  any other type (object, list, bool, null) is a ``file:line`` error, never silently rewritten.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from negkd.errors import UserError

_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def check_safetensors(path: Path) -> None:
    """Refuse a ``.safetensors`` file whose header is corrupt or whose data is truncated."""
    path = Path(path)
    fix = "it is truncated or corrupt; re-create it with the step that wrote it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file ({size} bytes); {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise UserError(f"{path}: not a safetensors file (header of {n} bytes in a {size}-byte file); {fix}")
            header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{path}: the safetensors header is not valid JSON; {fix}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the safetensors header is not a JSON object; {fix}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(x, int) for x in offs)):
            raise UserError(f"{path}: tensor {name!r} has no valid data_offsets; {fix}")
        end = max(end, offs[1])
    if 8 + n + end > size:
        raise UserError(f"{path}: holds {size} bytes but its tensors need {8 + n + end}; {fix}")


def check_model_dir(path: Path | str, flag: str = "") -> None:
    """Cheap integrity checks of a local model-like directory (no-op for a hub id)."""
    p = Path(path)
    if not p.is_dir():
        return
    who = f"{flag} " if flag else ""
    from negkd.io import refuse_unfinished, unfinished_run

    info = unfinished_run(p)
    if info is not None:  # a killed training step: its checkpoints are not a model
        refuse_unfinished(p, info)
    for f in sorted(p.rglob("*.json")):
        if f.name.startswith(".") or "checkpoints" in f.relative_to(p).parts:
            continue
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise UserError(f"{who}{f}: not valid JSON ({e}); the directory is damaged: re-create it with the "
                            "step that wrote it") from None
        if f.name.endswith("config.json") and not isinstance(obj, dict):
            raise UserError(f"{who}{f}: expected a JSON object; the directory is damaged")
    for f in sorted(p.rglob("*.safetensors")):
        if "checkpoints" not in f.relative_to(p).parts:
            check_safetensors(f)


def load_safetensors(path: Path) -> dict:
    """``safetensors.torch.load_file`` with the header checked first; errors name the file."""
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError and friends: a damaged file
        raise UserError(f"{path}: cannot load ({str(e).splitlines()[0][:200]}); re-create it with the step that "
                        "wrote it") from None


def scalar_text(value: Any, field: str, where: str) -> str:
    """A string, or a finite number rendered as its JSON text (``3.0`` -> ``"3"``)."""
    if isinstance(value, str):
        return value.strip() if field == "answer" else value
    if isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, int):
        return str(value)
    elif isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    raise UserError(f"{where}: {field!r} must be a string or a number, got {_kind(value)} {_short(value)}")


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", type(None): "null"}.get(type(v), type(v).__name__)


def _short(v: Any) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= 40 else s[:37] + "..."
