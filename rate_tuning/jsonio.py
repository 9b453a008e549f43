"""Strict JSON for every file the project writes or reads: one rule for non-finite numbers, bounded reads.

* **Writing.** :func:`to_json_value` turns arrays of size 1 into Python numbers and every non-finite
  float (NaN, +-inf) into ``null``; :func:`dumps` then writes strict JSON (``allow_nan=False``), so no file
  of the project (``metrics.jsonl``, ``summary.json``, checkpoint ``meta.json``, ``evidence.json``) ever
  holds ``NaN``, ``Infinity`` or a string standing for a number. A record that must say *why* a number is
  missing carries a flag of its own (e.g. ``diverged``).
* **Writing atomically.** :func:`write_atomic` writes a temporary file next to the target, fsyncs it and
  ``os.replace``-s it into place: a reader sees the old file or the new one, never a part.
* **Reading.** :func:`load` and :func:`loads` refuse a file over ``max_bytes`` and nesting deeper than
  ``MAX_DEPTH`` with :class:`JSONInputError` (a ``ValueError`` with a one-line message) instead of a
  ``MemoryError`` or ``RecursionError`` traceback.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted when reading (the project's own files use at most 5)."""

MAX_BYTES = 16 << 20
"""Largest JSON file :func:`load` reads (16 MiB; the project's own JSON files are far smaller)."""


class JSONInputError(ValueError):
    """A JSON text that is malformed, too large or too deeply nested (one-line message)."""


def to_json_value(v: Any) -> Any:
    """``v`` as plain JSON data: dicts, lists, str, bool, None, int and finite floats (non-finite -> None).

    Arrays of one element become Python scalars; larger arrays become (nested) lists; any other object
    its ``str``.
    """
    if isinstance(v, dict):
        return {str(k): to_json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_json_value(x) for x in v]
    if isinstance(v, (bool, np.bool_, str)) or v is None:
        return bool(v) if isinstance(v, np.bool_) else v
    if isinstance(v, (int, np.integer)):
        return int(v)
    try:
        a = np.asarray(v)
    except Exception:  # noqa: BLE001 -- an object numpy cannot take: its text
        return str(v)
    if a.dtype.kind not in "biuf":
        return str(v) if a.size == 1 else to_json_value(a.tolist())
    if a.size != 1:
        return to_json_value(a.tolist())
    if a.dtype.kind in "iu":
        return int(a.reshape(()))
    if a.dtype.kind == "b":
        return bool(a.reshape(()))
    x = float(a.reshape(()))
    return x if math.isfinite(x) else None


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON text of ``obj`` after :func:`to_json_value` (never ``NaN``/``Infinity``)."""
    return json.dumps(to_json_value(obj), allow_nan=False, **kwargs)


def write_atomic(path: str, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace`` (never a partial file).

    The temporary file is removed if writing fails (e.g. a full disk); the old ``path`` is then untouched.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(dumps(obj, indent=indent, sort_keys=True))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]")


def depth(text: str | bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings ignored)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode()
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.max(np.cumsum(steps)))


def loads(text: str | bytes, *, what: str = "JSON text") -> Any:
    """Parse ``text``; :class:`JSONInputError` naming ``what`` if it is malformed or nested too deeply."""
    if depth(text) > MAX_DEPTH:
        raise JSONInputError(f"{what} is nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise JSONInputError(f"{what} is not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def load(path: str, *, what: str | None = None, max_bytes: int = MAX_BYTES) -> Any:
    """Read and parse the JSON file ``path`` (at most ``max_bytes``); :class:`JSONInputError` if it is bad.

    ``OSError`` (missing file, permissions) passes through unchanged.
    """
    what = what or path
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JSONInputError(f"{what} is larger than {max_bytes} bytes")
    return loads(data, what=what)


__all__ = ["JSONInputError", "MAX_BYTES", "MAX_DEPTH", "depth", "dumps", "load", "loads", "to_json_value", "write_atomic"]
