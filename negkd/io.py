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
import re
import zlib
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
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
RUNNING = ".negkd-running.json"  # written by RunDir.start, removed by finish: "a step is writing here"
# files a step writes in place before it finishes (older runs carry no RUNNING marker)
STATE_FILES = {".sample-run.json": "sample", ".infer-state.json": "infer"}
IN_PLACE = {**STATE_FILES, "samples.jsonl": "sample", "predictions.jsonl": "infer"}


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
    if not path.is_file():  # a pipe (<(cat f)), socket or device: it cannot be hashed and re-read
        raise UserError(f"{path}: not a regular file (a pipe or device?); negkd hashes its inputs into the "
                        "manifest and may read them twice: write it to a file first")
    return path


def _check_text(obj: Any, raw: bytes) -> None:
    """A JSON ``\\ud800``-style escape may leave a lone surrogate that cannot be written back as UTF-8;
    find it now (only lines holding a surrogate escape pay for the check)."""
    if b"\\u" in raw and _SURROGATE.search(raw):
        json.dumps(obj, ensure_ascii=False).encode("utf-8")


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
                    _check_text(obj, raw)
                except json.JSONDecodeError as e:
                    raise UserError(
                        f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                        "expected one JSON object per line"
                    ) from None
                except RecursionError:
                    raise UserError(f"{path}:{lineno}: JSON nested too deeply; expected a flat record") from None
                except UnicodeEncodeError:
                    raise UserError(f"{path}:{lineno}: a string holds a lone UTF-16 surrogate escape "
                                    "(like \\ud800); fix the text") from None
                if not isinstance(obj, dict):
                    raise UserError(
                        f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                    )
                seen += 1
                yield lineno, obj
    except (gzip.BadGzipFile, EOFError, OSError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(f"{path}: no such file") from None
        raise UserError(f"{path}: cannot read ({e})") from None
    if seen == 0:
        raise UserError(f"{path}: empty file, expected JSON Lines records (one object per line)")


def _iter_json_array(path: Path, data: bytes) -> Iterator[tuple[int, dict]]:
    try:
        arr = json.loads(data.decode("utf-8"))
        _check_text(arr, data)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply; expected an array of flat records") from None
    except UnicodeEncodeError:
        raise UserError(f"{path}: a string holds a lone UTF-16 surrogate escape (like \\ud800); fix the text") from None
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


def read_json(path: Path, expect: type | None = None, fix: str = "") -> Any:
    """A JSON file; any unreadable, malformed or (with ``expect``) wrongly typed content is a
    one-line UserError naming ``fix`` (e.g. "rerun `negkd train-pos`")."""
    path = check_file(path)
    tail = f"; {fix}" if fix else ""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not a valid UTF-8 JSON file ({e}){tail}") from None
    if expect is not None and not isinstance(obj, expect):
        raise UserError(f"{path}: expected a JSON {expect.__name__}, got {type(obj).__name__}{tail}")
    return obj


def unfinished_run(d: Path) -> dict | None:
    """``{"command", "command_line"?}`` when ``d`` is a step's output directory that has no
    manifest.json (killed, failed, or still running); None for a finished run or a plain directory."""
    d = Path(d)
    if not d.is_dir() or (d / MANIFEST).exists():
        return None
    return _unfinished(d, IN_PLACE)


def _unfinished(d: Path, evidence: dict) -> dict | None:
    marker = d / RUNNING
    if marker.exists():
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            if isinstance(info, dict):
                return info
        except (OSError, ValueError):
            pass
        return {"command": "?"}
    for name, cmd in evidence.items():
        if (d / name).exists():
            return {"command": cmd}
    if evidence is IN_PLACE and (d / "checkpoints").is_dir():
        return {"command": "train-*"}
    return None


def refuse_unfinished(d: Path, info: dict, flag: str = "") -> None:
    cmd = info.get("command", "?")
    again = info.get("command_line") or f"the same `negkd {cmd} ... -o {d}` command"
    extra = f", or pass {flag} to use what it holds so far" if flag else ""
    raise UserError(f"{d}: an unfinished `negkd {cmd}` run (no {MANIFEST}: interrupted or still running); "
                    f"finish it first by rerunning {again}{extra}")


def resolve_input(path: Path, names: Sequence[str], produced_by: str = "", allow_unfinished: bool = False) -> Path:
    """A file is returned as is; a directory is searched for the first of ``names``.

    A directory must hold a finished run (its manifest.json), and a file must not sit in an
    unfinished run's directory: half a step's output is refused with the command that finishes
    it. ``allow_unfinished`` (the ``--allow-unfinished`` flag) accepts it with a warning."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        for name in names:
            for cand in (path / name, path / f"{name}.gz"):
                if cand.exists():
                    _check_finished(path, produced_by, allow_unfinished)
                    return cand
        hint = f" (the output of `negkd {produced_by}`)" if produced_by else ""
        raise UserError(
            f"{path}: directory holds none of {', '.join(names)}; pass the file itself or a directory{hint}"
        )
    # a file in a step's directory: refused only on that step's own word that it has not finished
    parent = path.parent
    info = None if (parent / MANIFEST).exists() else _unfinished(parent, STATE_FILES)
    if info is not None:
        _accept_or_refuse(path.parent, info, allow_unfinished)
    return check_file(path)


def _check_finished(d: Path, produced_by: str, allow_unfinished: bool) -> None:
    if (d / MANIFEST).exists():
        return
    info = unfinished_run(d) or {"command": produced_by or "?"}
    _accept_or_refuse(d, info, allow_unfinished)


def _accept_or_refuse(d: Path, info: dict, allow_unfinished: bool) -> None:
    if allow_unfinished:
        from negkd.console import warn

        warn(f"{d}: using the output of an UNFINISHED `negkd {info.get('command', '?')}` run "
             "(--allow-unfinished); results cover only what it wrote so far")
        return
    refuse_unfinished(d, info, "--allow-unfinished")


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
    for p in sorted(q for q in path.rglob("*")
                    if q.is_file() and ".tmp" not in q.name and q.name != RUNNING):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


def dumps(obj: Any) -> str:
    """One strict JSON line (NaN/Infinity are not JSON: they raise)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def dump_json(obj: Any) -> str:
    """A strict, indented JSON document (manifests, configs, state files)."""
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


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


_LOCKS: dict[str, int] = {}  # output directory -> the fd holding its flock


def release_locks() -> None:
    """Release every output-directory lock this process holds (cli._wrap calls it when a command ends)."""
    while _LOCKS:
        _, fd = _LOCKS.popitem()
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass


def command_line(out: Path) -> str | None:
    """The command that is running, to print as "rerun ..." (secrets scrubbed); None when negkd runs
    in-process (tests) and ``sys.argv`` is not negkd's."""
    import shlex

    argv = list(sys.argv)
    prog = Path(argv[0]).name if argv else ""
    if prog not in ("negkd", "__main__.py", "-m"):
        return None
    args, hide = [], False
    for a in argv[1:]:
        if hide:
            args.append("***")
            hide = False
            continue
        if a.split("=", 1)[0] in ("--api-key",):
            hide = "=" not in a
            args.append(a.split("=", 1)[0] + ("=***" if "=" in a else ""))
            continue
        args.append(a)
    return shlex.join(["negkd", *args])


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
        self._guard()

    def _guard(self) -> None:
        """Refuse an OUTPUT that is a file, that holds (or is) an input of this run, or that holds
        another command's run, finished or not: ``--overwrite`` redoes *this* command only."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"-o {out}: exists and is not a directory; choose another -o/--output")
        o = out.resolve()
        for p in self.input_paths:
            r = Path(p).resolve()
            if r == o or o in r.parents:
                raise UserError(f"-o {out}: holds this run's input {p}; writing there would destroy it, "
                                "choose another -o/--output")
        if not out.is_dir():
            return
        prev = self.previous()
        other = prev.get("command") if prev is not None else (unfinished_run(out) or {}).get("command")
        if other in (None, "?", self.command) or (other == "train-*" and self.command.startswith("train")) \
                or (other == "train-*" and self.command == "calibrate"):
            return
        state = "a finished" if prev is not None else "an unfinished"
        raise UserError(f"-o {out}: holds {state} `negkd {other}` run; --overwrite only redoes `negkd {self.command}` "
                        "runs, so choose another -o/--output")

    def lock(self) -> "RunDir":
        """Take DIR's exclusive lock for this process (released when the command returns): a second
        command writing the same directory is refused instead of silently replacing its outputs.
        A directory that does not exist yet holds nothing to protect (``start`` creates, then locks it)."""
        if not self.out.is_dir() or os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) not in ("", "0"):
            return self  # nothing to protect yet / under `accelerate launch` the main process holds it
        key = str(self.out.resolve())
        if key in _LOCKS:  # this process holds it already
            return self
        fd = os.open(self.out, os.O_RDONLY)  # flock the directory itself: no lock file to leave behind
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows
            pass
        except OSError:
            os.close(fd)
            raise UserError(f"{self.out}: another negkd command is writing to this directory; wait for it to end "
                            "or choose another -o/--output") from None
        _LOCKS[key] = fd
        return self

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
        self.lock()  # held from the first look: a concurrent command in DIR is refused before any work
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
        self.lock()
        atomic_write_text(self.out / RUNNING, dump_json({"command": self.command, "command_line": command_line(self.out),
                                                         "pid": os.getpid()}))
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
        tmp.write_text(dump_json(_jsonable(obj)), encoding="utf-8")
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
        atomic_write_text(self.manifest_path, dump_json(manifest))
        (self.out / RUNNING).unlink(missing_ok=True)
        return manifest

    def cleanup(self) -> None:
        """Remove staged temp outputs (called on failure); a run that leaves nothing else behind
        also removes its "running" marker, so the directory is as before."""
        for tmp in self._staged.values():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                tmp.unlink()
        marker = self.out / RUNNING
        if marker.exists() and all(p.name == RUNNING for p in self.out.iterdir()):
            marker.unlink()
