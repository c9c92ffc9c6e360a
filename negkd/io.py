"""JSONL reading/writing, input resolution, and the run directory (atomic outputs + manifest).

Rules every step follows (style guide, rule 1-2):
- inputs are files or the output directory of an earlier step (``resolve_input``);
- outputs are staged under temporary names and renamed into place only when the step
  finishes; ``manifest.json`` is written *last*, so its presence means "this step finished";
- rerunning with identical inputs and arguments is a no-op (``RunDir.up_to_date``);
  ``--overwrite`` redoes the work.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from negkd import __version__
from negkd.errors import UserError

MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- reading


def _open_binary(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def check_file(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a .jsonl file")
    return path


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL(.gz) file.

    Also reads a file holding one JSON array of objects (e.g. SVAMP's ``.json``).
    Raises ``UserError("file:line: ...")`` on bad UTF-8, bad JSON or a non-object line,
    and on an empty file.
    """
    path = check_file(path)
    seen = 0
    try:
        with _open_binary(path) as fh:
            head = fh.read(1 << 16)
            stripped = head.lstrip()
            if stripped.startswith(b"["):  # a JSON array file
                data = head + fh.read()
                yield from _iter_json_array(path, data)
                return
            stream = io.BufferedReader(_Prepend(head, fh))
            for lineno, raw in enumerate(stream, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8"
                    ) from None
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                        "expected one JSON object per line"
                    ) from None
                if not isinstance(obj, dict):
                    raise UserError(
                        f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                    )
                seen += 1
                yield lineno, obj
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"{path}: no such file") from None
        raise UserError(f"{path}: cannot read ({e})") from None
    if seen == 0:
        raise UserError(f"{path}: empty file, expected JSON Lines records (one object per line)")


def _iter_json_array(path: Path, data: bytes) -> Iterator[tuple[int, dict]]:
    try:
        arr = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(arr, list) or not arr:
        raise UserError(f"{path}: empty JSON array, expected records")
    for i, obj in enumerate(arr, start=1):
        if not isinstance(obj, dict):
            raise UserError(f"{path}:item {i}: expected a JSON object, got {type(obj).__name__}")
        yield i, obj


class _Prepend(io.RawIOBase):
    """A raw stream that first returns ``head`` and then the rest of ``fh``."""

    def __init__(self, head: bytes, fh):
        self._head, self._fh = head, fh

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        chunk = self._fh.read(len(b))
        b[: len(chunk)] = chunk
        return len(chunk)


def read_json(path: Path) -> Any:
    path = check_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a valid UTF-8 JSON file ({e})") from None


def resolve_input(path: Path, names: Sequence[str], produced_by: str = "") -> Path:
    """A file is returned as is; a directory is searched for the first of ``names``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        for name in names:
            for cand in (path / name, path / f"{name}.gz"):
                if cand.exists():
                    return cand
        hint = f" (the output of `negkd {produced_by}`)" if produced_by else ""
        raise UserError(
            f"{path}: directory holds none of {', '.join(names)}; pass the file itself or a directory{hint}"
        )
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path) -> str:
    """Hash of a file, or of every file (name + content) under a directory, excluding temp files."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and ".tmp" not in q.name):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write records to ``path`` (gzip if it ends in .gz). Not atomic: use RunDir for that."""
    n = 0
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for rec in records:
            fh.write(dumps(rec) + "\n")
            n += 1
    return n


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def count_lines(path: Path) -> int:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


# --------------------------------------------------------------------------- run dir


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "value") and not isinstance(v, (str, int, float, bool)):  # enums
        return v.value
    return v


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunDir:
    """An output directory of one step.

    Typical use::

        run = RunDir(out, "split", args, inputs=[path], overwrite=overwrite)
        if run.up_to_date():
            return                      # prints "up to date" itself
        run.start()
        run.write_jsonl("pos.jsonl", pos)   # staged under a temp name
        run.finish()                        # renames outputs, then writes manifest.json last

    ``args`` are the arguments that determine the outputs (not e.g. ``--workers``).
    """

    def __init__(
        self,
        out: Path,
        command: str,
        args: dict[str, Any],
        inputs: Sequence[Path] = (),
        overwrite: bool = False,
        quiet: bool = False,
    ):
        self.out = Path(out)
        self.command = command
        self.args = _jsonable(args)
        self.input_paths = [Path(p) for p in inputs]
        self.overwrite = overwrite
        self.quiet = quiet
        self._inputs: list[dict] | None = None
        self._staged: dict[str, Path] = {}
        self._outputs: dict[str, dict] = {}
        self._t0 = time.time()

    # ---- inputs and the no-op check
    @property
    def inputs(self) -> list[dict]:
        if self._inputs is None:
            self._inputs = [
                {"path": str(p), "sha256": sha256_tree(p)} for p in self.input_paths
            ]
        return self._inputs

    @property
    def manifest_path(self) -> Path:
        return self.out / MANIFEST

    def previous(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def up_to_date(self) -> bool:
        """True (and says so) when a finished run with the same command, arguments and
        input contents is already in ``out``; never with ``--overwrite``."""
        if self.overwrite:
            return False
        prev = self.previous()
        if prev is None:
            return False
        same = (
            prev.get("command") == self.command
            and prev.get("args") == self.args
            and [i["sha256"] for i in prev.get("inputs", [])] == [i["sha256"] for i in self.inputs]
            and all((self.out / name).exists() for name in prev.get("outputs", {}))
        )
        if same:
            if not self.quiet:
                from negkd.console import log

                log(f"{self.out}: up to date (same inputs and arguments); nothing to do. Pass --overwrite to redo.")
            return True
        if prev.get("command") != self.command:
            raise UserError(
                f"{self.out}: holds the output of `negkd {prev.get('command')}`; choose another -o/--output directory"
            )
        diff = sorted(k for k in set(prev.get("args", {})) | set(self.args)
                      if prev.get("args", {}).get(k) != self.args.get(k))
        what = f"arguments differ: {', '.join(diff)}" if diff else "inputs changed"
        raise UserError(
            f"{self.out}: holds a finished run with other settings ({what}); pass --overwrite to redo it or choose another -o/--output"
        )

    # ---- staging
    def start(self) -> "RunDir":
        self.out.mkdir(parents=True, exist_ok=True)
        if self.manifest_path.exists():  # outputs are about to change: the old manifest no longer holds
            self.manifest_path.unlink()
        _ = self.inputs  # hash inputs now, before they could change under us
        self._remove_stale_temps()
        return self

    def _remove_stale_temps(self) -> None:
        """Delete ``.NAME.tmp-PID`` left by a killed run (SIGKILL skips ``cleanup``); temps of a live
        process (another rank, or a run still going) are left alone."""
        for tmp in self.out.glob(".*.tmp-*"):
            pid = tmp.name.rsplit(".tmp-", 1)[1]
            if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
                continue
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

    def tmp(self, name: str) -> Path:
        """A temporary path (file or directory) that ``finish`` renames to ``out/name``."""
        tmp = self.out / f".{name}.tmp-{os.getpid()}"
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
        self._staged[name] = tmp
        return tmp

    def write_jsonl(self, name: str, records: Iterable[dict]) -> int:
        n = write_jsonl(self.tmp(name), records)
        self._outputs[name] = {"records": n}
        return n

    def write_json(self, name: str, obj: Any) -> None:
        tmp = self.tmp(name)
        tmp.write_text(json.dumps(_jsonable(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self._outputs.setdefault(name, {})

    def record_output(self, name: str, **info: Any) -> None:
        """Declare an output written in place (e.g. an append-only resumable file)."""
        self._outputs[name] = info

    def finish(self, **extra: Any) -> dict:
        """Rename staged outputs into place, then write manifest.json (last)."""
        for name, tmp in self._staged.items():
            final = self.out / name
            if final.is_dir() and not final.is_symlink():
                shutil.rmtree(final)
            os.replace(tmp, final)
        for name, info in self._outputs.items():
            p = self.out / name
            if p.is_file() and "records" not in info and p.suffix in (".jsonl", ".gz"):
                info["records"] = count_lines(p)
        manifest = {
            "command": self.command,
            "args": self.args,
            "negkd_version": __version__,
            "python": sys.version.split()[0],
            "inputs": self.inputs,
            "outputs": self._outputs,
            "started_at": datetime.fromtimestamp(self._t0, timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": round(time.time() - self._t0, 3),
            **_jsonable(extra),
        }
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return manifest

    def cleanup(self) -> None:
        """Remove staged temp outputs (called on failure)."""
        for tmp in self._staged.values():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
