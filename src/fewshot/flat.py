"""Nested settings as dotted keys: {"trainer": {"meta_lr": 0.001}} -> {"trainer.meta_lr": 0.001}, the keys an
override names. Shared by resume's settings check, the ledger and fewshot-table's pooling check."""

from __future__ import annotations

from typing import Any, Iterable


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted key; a list is one leaf (its order is part of the setting)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def under(key: str, names: Iterable[str]) -> bool:
    """Whether a dotted key is one of `names` or below one (device.name under device; a trailing dot is ignored)."""
    return any(key == n or key.startswith(n + ".") for n in (n.rstrip(".") for n in names))
