"""Measured verdicts kept on disk, so a second compile of the same (or a same-shaped) model measures nothing.

A verdict is keyed by what decided it — the cost model's (target, backend, ISA, library versions), the verdict's
name, and what was measured: probe sizes, or a graph's text with its weights' and inputs' shapes and dtypes (never
the model's identity or its weights' values). The store is an SQLite database in the user's cache directory
(`$XDG_CACHE_HOME/graphopt/verdicts.sqlite3`, beside the tuning database): SQLite's locking makes it safe for
concurrent compiles, and its transactions for a killed one. Values are JSON, never pickles."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

MISSING = object()


def default_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "graphopt" / "verdicts.sqlite3"


def key_of(*parts: Any) -> str:
    """A stable digest of JSON-able parts (tuples and lists alike)."""
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()


def graph_signature(graph, args: tuple, kwargs: dict | None) -> str:
    """What a graph's timing depends on: its ops and shapes (the text form), its weights' shapes and dtypes,
    and the inputs' shapes and dtypes."""
    import torch
    from ..ir.text import graph_text
    weights = sorted((name, tuple(t.shape), str(t.dtype)) for name, t in
                     [*graph.module.named_parameters(), *graph.module.named_buffers()])
    inputs = [(tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else repr(t)
              for t in graph.flat_inputs(args, kwargs or {})]
    return key_of(graph_text(graph), weights, inputs)


def lowering_key(graph, args: tuple, kwargs: dict | None) -> str:
    """What a graph's lowering depends on, exactly: its signature (graph_signature), and the identity and version of
    each weight tensor (the same tensors, not changed in place since, with the same strides)."""
    import torch
    tensors = [(n.target, t.data_ptr(), t._version, tuple(t.stride()))
               for n in graph.fx.find_nodes(op="get_attr") for t in [graph.constant(n)] if isinstance(t, torch.Tensor)]
    return key_of(graph_signature(graph, args, kwargs), tensors)


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a verdict must be plain data (numbers, strings, tuples, lists, dicts), got {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {_decode(k): _decode(v) for k, v in value["__dict__"]}
    return value


class VerdictStore:
    """key → verdict in an SQLite file. A store that cannot be opened or written (a read-only home, a damaged file)
    measures as if empty: a cache is never the reason a compile fails."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        self._db: sqlite3.Connection | None = None
        self.broken: str | None = None     # why the store is not in use

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is None and self.broken is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            except (OSError, sqlite3.Error) as e:
                self.broken, self._db = f"{self.path}: {e}", None
        return self._db

    def get(self, key: str) -> Any:
        db = self._connect()
        if db is None:
            return MISSING
        try:
            row = db.execute("SELECT value FROM verdicts WHERE key = ?", (key,)).fetchone()
            return MISSING if row is None else _decode(json.loads(row[0]))
        except (sqlite3.Error, ValueError, KeyError, TypeError) as e:   # a damaged row measures again
            self.broken = f"{self.path}: {e}"
            return MISSING

    def put(self, key: str, value: Any) -> None:
        db = self._connect()
        if db is None:
            return
        text = json.dumps(_encode(value))
        with contextlib.suppress(sqlite3.Error):   # a full disk or a lock held too long: not worth a failed compile
            db.execute("INSERT OR REPLACE INTO verdicts (key, value) VALUES (?, ?)", (key, text))

    def __len__(self) -> int:
        db = self._connect()
        return 0 if db is None else db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
