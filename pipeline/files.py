"""Our files on disk: writes that are never seen half-done, and tensor files loaded
without running code from them.

Which ranks run it: whichever rank writes or reads the file (the callers say which).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

log = logging.getLogger("pipeline.files")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, then rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def read_json_lines(path: Path) -> list[dict]:
    """The records of an append-only JSON-lines log of ours (metrics.jsonl, fid.jsonl: each a
    record with an integer "step"). A torn last line is the expected trace of a kill during a
    write: dropped with a warning. Damage anywhere else is a UserError naming file and line."""
    from pipeline.errors import UserError

    lines = Path(path).read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer step")
        except ValueError as exc:
            if number == len(lines):
                log.warning("%s: dropped a torn last line (%d bytes), as a kill during a write leaves", path, len(line))
                continue
            raise UserError(f"{path}: line {number} is damaged ({exc}); fix or remove that line") from None
        records.append(record)
    return records


# What torch.load(weights_only=True, map_location="cpu") raises on a file that is damaged or
# not a torch file (seen with torch 2.13): RuntimeError for a broken zip ("failed finding
# central directory"), EOFError for an empty file, KeyError or UnpicklingError for other
# bytes. On the CPU no other RuntimeError comes from the file's contents.
DAMAGED_TORCH_FILE = (RuntimeError, EOFError, KeyError, ValueError)


def require_fields(record: dict, fields: dict[str, type], what: str) -> None:
    """A file of ours read back: each field present with its type, or a UserError naming the
    file (`what`) and the field. Files written by an older or newer version, or by hand, get a
    message instead of a KeyError deep in the code that reads them."""
    from pipeline.errors import UserError

    for name, kind in fields.items():
        if name not in record:
            raise UserError(f"{what} lacks the field {name!r}: damaged, or not written by this project")
        value = record[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{what}: field {name!r} should be {kind.__name__}, got {type(value).__name__}")


def keep_records_through(path: Path, step: int) -> list[dict]:
    """Drop the records of a JSON-lines log (metrics.jsonl, fid.jsonl) written after `step`, and a
    torn last line (what a kill mid-write leaves), rewriting the file atomically; returns the
    records kept. Used on a resume, whose checkpoint is of `step`."""
    if not path.exists():
        return []
    kept = [record for record in read_json_lines(path) if record["step"] <= step]
    write_bytes_atomic(path, "".join(json.dumps(record) + "\n" for record in kept).encode())
    return kept


def _refusal(exc: Exception) -> str:
    """The reason in torch's weights_only refusal ("unsupported GLOBAL posix.system ..."),
    without its advice to load with weights_only=False, which would run the file's code."""
    text = str(exc).rsplit("WeightsUnpickler error:", 1)[-1]
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    boilerplate = ("Weights only load failed", "Check the documentation")
    kept = [p for p in paragraphs if not p.startswith(boilerplate)] or paragraphs or [""]
    return kept[0].splitlines()[0][:200]


def load_tensors(path: str | Path, what: str):
    """torch.load onto the CPU with weights_only=True: tensors and plain containers only, so
    loading never runs code from the file. A missing, damaged or crafted file is a UserError
    naming it (`what` says what the file is).

    torch's own message for a refused file advises loading with weights_only=False, which
    would run that code; it is not repeated here."""
    import torch  # here, not at the top: `prepare` uses this module's writers and never needs torch

    from pipeline.errors import UserError

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except pickle.UnpicklingError as exc:
        raise UserError(f"{what} {path} is damaged or holds more than tensors; refused ({_refusal(exc)})") from None
    except DAMAGED_TORCH_FILE as exc:
        reason = (str(exc).splitlines() or [""])[0].split(". ")[0][:200]  # torch's first sentence
        raise UserError(f"{what} {path} is damaged or not a torch file ({type(exc).__name__}: {reason})") from None
