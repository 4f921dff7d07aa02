"""Sentences several features say the same way: drift between nodes, did-you-mean hints."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def differs(label: str, values: dict[str, list[str]]) -> str | None:
    """`torch differs: 2.13.0 on a, b; 2.12.1 on c` from value -> nodes; None for one value."""
    if len(values) < 2:
        return None
    return f"{label} differs: " + "; ".join(f"{v} on {', '.join(ns)}" for v, ns in values.items())


def group_by(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(node, value) pairs as value -> nodes, in first-seen order."""
    out: dict[str, list[str]] = {}
    for node, value in pairs:
        out.setdefault(value, []).append(node)
    return out


def suggestion(wanted: str, names: list[str], ids: list[str], listing: str) -> str:
    """`did you mean: a, b` when something is close to `wanted`, else `<listing>: ten names`."""
    close = difflib.get_close_matches(wanted, names + ids, n=5, cutoff=0.5)
    if close:
        return f"did you mean: {', '.join(close)}"
    return f"{listing}: {', '.join(names[:10])}" if names else ""
