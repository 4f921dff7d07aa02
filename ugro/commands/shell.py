"""Quoting for a node's shell, and the marker that ends a job's output."""

from __future__ import annotations

import shlex

from ..config import Node

EXIT_MARKER = "\x1eUGRO_EXIT"  # record separator: never part of a training log line

# The marker as printf writes it, and how far from a file's end its line can start
# (newline, marker, space, an exit code or `killed`/`missing`, newline).
MARKER_PRINTF = EXIT_MARKER.replace("\x1e", "\\036")
MARKER_SPAN = len(EXIT_MARKER) + 30


def q(value) -> str:
    return shlex.quote(str(value))


def rpath(path: str) -> str:
    """Quote a path for a node's shell; `~` and `~/...` mean that node's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + q(path[2:])
    return q(path)


def join(argv: list[str]) -> str:
    # `~/...` words (a venv's python, say) mean the node's home, as in a shell.
    return " ".join(rpath(a) if a.startswith("~/") else q(a) for a in argv)


def in_project(node: Node, command: str) -> str:
    return f"cd {rpath(node.project_path)} || exit 1; {command}"
