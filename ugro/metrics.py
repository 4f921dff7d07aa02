"""Training metrics from text: UGRO's ``metrics.jsonl`` and the plain log lines of any script.

Everything here is a pure function over text (``load_metrics`` only adds reading the files), and
no input string makes a parser raise: logs are half-written, interleaved across ranks and full of
progress bars and tracebacks, and a bad line must cost that line only.

Log lines understood (a launcher prefix such as ``gpu1 r0 | `` or ``[default0]:`` is harmless)::

    step 10 | epoch 1 | loss 2.3456 | lr 3.00e-03 | samples/s 1234.5   (UGRO's training scripts)
    {'loss': 2.1, 'grad_norm': tensor(0.53, device='cuda:0'), 'learning_rate': 0.0002, 'epoch': 0.4}
    iter 100: loss 2.1234, time 35.20ms, mfu 12.30%                     (nanoGPT)
    step 10: loss 2.31, lr 2e-4        step=10 loss=2.31 lr=2e-4
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

_FIELDS = ("step", "epoch", "loss", "lr", "samples_per_sec", "time")

_ALIASES = {
    "learning_rate": "lr",
    "iter": "step",
    "iteration": "step",
    "global_step": "step",
    "train_loss": "loss",
    "samples/s": "samples_per_sec",
    "samples_per_second": "samples_per_sec",
    "train_samples_per_second": "samples_per_sec",
}

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"

# A key is a whole token, so `gpu1` or `checkpoint-500` never reads as `gpu = 1`; quotes around
# the key are allowed for dicts that ast cannot read. A value is followed by a unit (`35.2ms`) or
# by nothing word-like, so `1.2.3` and `3f2a` are not numbers; `10/100` reads as 10.
_PAIR_RE = re.compile(
    r"(?<![\w/.\-])(?P<key>[A-Za-z][\w/.\-]*)(?![\w/.\-])"
    r"['\"]?\s*[:=]?\s*"
    r"(?:(?P<number>" + _NUMBER + r")(?P<unit>%|[A-Za-z]+)?"
    r"|(?P<special>[-+]?(?:nan|inf(?:inity)?)))"
    r"(?!\w|\.\d)",
    re.IGNORECASE,
)
_URL_RE = re.compile(r"\b[a-z][a-z0-9+.\-]*://\S*", re.IGNORECASE)
# nanoGPT's eval line is `step 100: train loss 2.1, val loss 2.2`: without joining the words the
# val loss would be lost, or taken for the training loss.
_QUALIFIED_RE = re.compile(
    r"\b(train|val|valid|validation|eval|test)\s+(loss|ppl|perplexity|acc|accuracy)\b",
    re.IGNORECASE,
)
# Hugging Face prints `grad_norm` as a torch repr, which ast.literal_eval cannot read.
_TENSOR_RE = re.compile(r"tensor\(\s*([^,()]+?)\s*(?:,[^()]*)?\)")

_SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class MetricPoint:
    """One logged training step; fields a line did not carry are None."""

    step: int | None = None
    epoch: float | None = None
    loss: float | None = None
    lr: float | None = None
    samples_per_sec: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    time: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        """Flat dict in the metrics.jsonl shape (None omitted), so parse_jsonl reads it back."""
        out: dict[str, float | int] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None:
                out[f.name] = value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out


def parse_jsonl(text: str) -> list[MetricPoint]:
    """Points from metrics.jsonl text; lines that are not JSON objects are skipped.

    A run that is still writing leaves a truncated last line, which is skipped like any garbage.
    JSON's NaN and Infinity are kept as float nan/inf so that a diverged run shows.
    """
    points = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            point = _point(obj.items())
            if point is not None:
                points.append(point)
    return points


def parse_log_line(line: str) -> MetricPoint | None:
    """The metrics in one log line, or None when it has neither a loss nor a step."""
    line = _QUALIFIED_RE.sub(r"\1_\2", _URL_RE.sub(" ", line))
    pairs: list[tuple[str, object]] = []
    start, end = line.find("{"), line.rfind("}")
    if 0 <= start < end:
        mapping = _literal_dict(line[start : end + 1])
        if mapping is not None:
            pairs.extend(mapping.items())
            line = f"{line[:start]} {line[end + 1 :]}"
    pairs.extend(_regex_pairs(line))
    return _point(pairs)


def parse_log(text: str) -> list[MetricPoint]:
    """Points from every log line that carries metrics, in order."""
    return [point for line in text.splitlines() if (point := parse_log_line(line)) is not None]


def load_metrics(job_dir: Path) -> list[MetricPoint]:
    """A job's points: from metrics.jsonl, else from its logs/*.log.

    The logs are the fallback for scripts that write no metrics.jsonl (or an unreadable one).
    Several ranks or hosts log the same step, so each step is kept once, where it first appears.
    """
    jsonl = job_dir / "metrics.jsonl"
    if jsonl.is_file():
        points = parse_jsonl(jsonl.read_text(encoding="utf-8", errors="replace"))
        if points:
            return points
    seen: set[int] = set()
    points = []
    for log in sorted((job_dir / "logs").glob("*.log")):
        for point in parse_log(log.read_text(encoding="utf-8", errors="replace")):
            if point.step is None or point.step not in seen:
                if point.step is not None:
                    seen.add(point.step)
                points.append(point)
    return points


def summarize(points: Iterable[MetricPoint]) -> dict[str, float | int | None]:
    """Headline numbers of a run; a value is None when no point carries it.

    final_loss is the last loss as logged (nan for a diverged run); best_loss ignores nan/inf.
    """
    points = list(points)
    steps = [p.step for p in points if p.step is not None]
    losses = [p.loss for p in points if p.loss is not None]
    best = min(
        (p for p in points if p.loss is not None and math.isfinite(p.loss)),
        key=lambda p: p.loss,
        default=None,
    )
    epochs = [p.epoch for p in points if p.epoch is not None and math.isfinite(p.epoch)]
    rates = [
        p.samples_per_sec
        for p in points
        if p.samples_per_sec is not None and math.isfinite(p.samples_per_sec)
    ]
    return {
        "steps": steps[-1] if steps else None,
        "final_loss": losses[-1] if losses else None,
        "best_loss": best.loss if best else None,
        "best_step": best.step if best else None,
        "epochs": max(epochs, default=None),
        "samples_per_sec": _mean(rates) if rates else None,
        "points": len(points),
    }


def sparkline(values: Iterable[float | None], width: int = 40) -> str:
    """Unicode block sparkline of the finite values, averaged down to at most width chars."""
    data = [v for v in values if v is not None and math.isfinite(v)]
    if not data or width < 1:
        return ""
    if len(data) > width:
        n = len(data)
        data = [_mean(data[i * n // width : (i + 1) * n // width]) for i in range(width)]
    lo, hi = min(data), max(data)
    if lo == hi:
        return _SPARK_BLOCKS[len(_SPARK_BLOCKS) // 2 - 1] * len(data)
    top = len(_SPARK_BLOCKS) - 1
    # Halved so that the span of two huge finite values cannot overflow to inf.
    span = hi / 2 - lo / 2
    return "".join(_SPARK_BLOCKS[round((v / 2 - lo / 2) / span * top)] for v in data)


def _mean(values: list[float]) -> float:
    # Dividing first keeps the sum of huge finite values finite.
    return sum(v / len(values) for v in values)


def _literal_dict(text: str) -> dict | None:
    try:
        obj = ast.literal_eval(_TENSOR_RE.sub(r"\1", text))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _regex_pairs(line: str) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = []
    for m in _PAIR_RE.finditer(line):
        key, unit = m["key"], m["unit"]
        if m["special"] is not None:
            pairs.append((key, m["special"]))
        elif unit and unit != "%":
            # `time 35.2ms` is a duration, not the `time` field (a Unix timestamp).
            pairs.append((f"{key}_{unit}", m["number"]))
        else:
            pairs.append((key, m["number"]))
    return pairs


def _point(pairs: Iterable[tuple[object, object]]) -> MetricPoint | None:
    """A point from (key, value) pairs; values that are not numbers are dropped."""
    items = [(key.strip().lower(), value) for key, value in pairs if isinstance(key, str)]
    found: dict[str, int | float] = {}
    extra: dict[str, float] = {}
    # Exact names first, so `loss` beats `train_loss` wherever each stands; then the first wins.
    for key, value in sorted(items, key=lambda item: item[0] not in _FIELDS):
        name = _ALIASES.get(key, key)
        if name in _FIELDS and name not in found:
            converted = _int(value) if name == "step" else _float(value)
            if converted is not None:
                found[name] = converted
                continue
        if key not in _FIELDS and (number := _float(value)) is not None:
            extra.setdefault(key, number)
    if "step" not in found and "loss" not in found:
        return None
    return MetricPoint(extra=extra, **found)


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    number = _float(value)
    if number is None or not number.is_integer():
        return None
    return int(number)
