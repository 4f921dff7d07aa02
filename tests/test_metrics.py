import json
import math
import random

import pytest

from ugro.metrics import (
    MetricPoint,
    load_metrics,
    parse_jsonl,
    parse_log,
    parse_log_line,
    sparkline,
    summarize,
)

UGRO_JSONL = """\
{"step": 10, "epoch": 1, "loss": 2.31, "lr": 0.0002, "samples_per_sec": 123.4, "time": 1769000000.0}
{"step": 20, "epoch": 1, "loss": 2.05, "lr": 0.0002, "samples_per_sec": 125.0, "time": 1769000010.5}
"""

# Text with no metric in it anywhere.
GARBAGE = [
    "",
    "   ",
    "\x00\x01\x02\xff\xfe",
    "\ufffd\ufffd\x1b[31mERROR\x1b[0m",
    "{",
    "}{",
    "{'epoch'",
    "{" * 100_000,
    "[" * 100_000,
    "step " + "1" * 10_000 + "x",
    "loss: information",
    "version 1.2.3",
    "\ud800 lone surrogate",
    "null",
    "[1, 2, 3]",
]

# Not JSON, but a log line may still carry its metrics.
HALF_JSON = ['{"step": 10, "loss": 2.3', "{'loss': 2.1, 'epoch'", '{"step": 10, "loss": 2.3}}']


def short(value):
    """Test id: the samples include 100k-character strings."""
    return ascii(value)[:40]


# --- MetricPoint ---------------------------------------------------------------------------------


def test_as_dict_omits_none_and_flattens_extra():
    p = MetricPoint(step=3, loss=1.5, extra={"grad_norm": 0.7})
    assert p.as_dict() == {"step": 3, "loss": 1.5, "grad_norm": 0.7}


def test_as_dict_round_trips_through_parse_jsonl():
    p = MetricPoint(
        step=7,
        epoch=0.5,
        loss=float("nan"),
        lr=1e-4,
        samples_per_sec=99.0,
        extra={"val_loss": 2.2, "time_ms": 35.2},
        time=1769000000.0,
    )
    (back,) = parse_jsonl(json.dumps(p.as_dict()))
    assert math.isnan(back.loss)
    assert back.as_dict().keys() == p.as_dict().keys()
    assert (back.step, back.epoch, back.lr, back.time) == (7, 0.5, 1e-4, 1769000000.0)
    assert back.extra == p.extra


# --- parse_jsonl ---------------------------------------------------------------------------------


def test_jsonl_ugro_format():
    points = parse_jsonl(UGRO_JSONL)
    assert points == [
        MetricPoint(
            step=10, epoch=1.0, loss=2.31, lr=0.0002, samples_per_sec=123.4, time=1769000000.0
        ),
        MetricPoint(
            step=20, epoch=1.0, loss=2.05, lr=0.0002, samples_per_sec=125.0, time=1769000010.5
        ),
    ]
    assert isinstance(points[0].step, int)


def test_jsonl_skips_blank_garbage_non_objects_and_partial_last_line():
    text = (
        "\n"
        '{"step": 1, "loss": 3.0}\n'
        "Traceback (most recent call last):\n"
        "[1, 2]\n"
        '"just a string"\n'
        "42\n"
        "\x00\xff garbage\n"
        '{"event": "start", "world_size": 4}\n'
        '{"step": 2, "loss": 2.9}\r\n'
        '{"step": 3, "loss": 2.'
    )
    assert [(p.step, p.loss) for p in parse_jsonl(text)] == [(1, 3.0), (2, 2.9)]


@pytest.mark.parametrize(
    "token, check",
    [
        ("NaN", math.isnan),
        ("Infinity", lambda v: v == math.inf),
        ("-Infinity", lambda v: v == -math.inf),
    ],
)
def test_jsonl_keeps_non_finite_loss(token, check):
    (p,) = parse_jsonl(f'{{"step": 5, "loss": {token}}}')
    assert check(p.loss)


def test_jsonl_aliases_extra_and_odd_values():
    (p,) = parse_jsonl(
        '{"global_step": 4, "train_loss": 1.0, "learning_rate": 3e-4,'
        ' "train_samples_per_second": 50, "grad_norm": 0.9, "tokens": 4096,'
        ' "name": "run-a", "ok": true, "nested": {"a": 1}, "eval": null}'
    )
    assert (p.step, p.loss, p.lr, p.samples_per_sec) == (4, 1.0, 3e-4, 50.0)
    assert p.extra == {"grad_norm": 0.9, "tokens": 4096.0}


def test_jsonl_exact_name_beats_alias_which_is_kept_as_extra():
    (p,) = parse_jsonl('{"train_loss": 9.0, "loss": 1.0, "step": 1}')
    assert p.loss == 1.0
    assert p.extra == {"train_loss": 9.0}


@pytest.mark.parametrize(
    "line, step",
    [
        ('{"step": 10.0, "loss": 1}', 10),
        ('{"step": "12", "loss": 1}', 12),
        ('{"step": 10.5, "loss": 1}', None),
        ('{"step": true, "loss": 1}', None),
        ('{"step": 1e400, "loss": 1}', None),
    ],
)
def test_jsonl_step_must_be_an_integer(line, step):
    (p,) = parse_jsonl(line)
    assert p.step == step


@pytest.mark.parametrize("text", GARBAGE + HALF_JSON, ids=short)
def test_jsonl_never_raises_on_garbage(text):
    assert parse_jsonl(text) == []


# --- parse_log_line ------------------------------------------------------------------------------

UGRO_LINE = "step 10 | epoch 1 | loss 2.3456 | lr 3.00e-03 | samples/s 1234.5"
UGRO_POINT = {"step": 10, "epoch": 1.0, "loss": 2.3456, "lr": 3e-3, "samples_per_sec": 1234.5}


@pytest.mark.parametrize(
    "line",
    [
        UGRO_LINE,
        f"gpu1 r0 | {UGRO_LINE}",
        f"[default0]:{UGRO_LINE}",
        f"2026-01-21 10:00:00,123 INFO {UGRO_LINE}",
        f"{UGRO_LINE}\n",
    ],
)
def test_ugro_line_with_and_without_launcher_prefix(line):
    assert parse_log_line(line).as_dict() == UGRO_POINT


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            "step 10: loss 2.31, lr 2e-4",
            {"step": 10, "loss": 2.31, "lr": 2e-4},
        ),
        (
            "step=10 loss=2.31 lr=2e-4",
            {"step": 10, "loss": 2.31, "lr": 2e-4},
        ),
        (
            "Step: 10, Loss = 2.31, learning_rate: 2e-4, samples_per_second: 80",
            {"step": 10, "loss": 2.31, "lr": 2e-4, "samples_per_sec": 80.0},
        ),
        (
            "iteration 7 train_loss 1.5",
            {"step": 7, "loss": 1.5},
        ),
        (
            "INFO:__main__:global_step=30 loss=0.9",
            {"step": 30, "loss": 0.9},
        ),
        (
            "step 10/100 loss 2.0",
            {"step": 10, "loss": 2.0},
        ),
    ],
)
def test_key_value_lines(line, expected):
    assert parse_log_line(line).as_dict() == expected


def test_nanogpt_iter_line():
    p = parse_log_line("iter 100: loss 2.1234, time 35.20ms, mfu 12.30%")
    assert (p.step, p.loss) == (100, 2.1234)
    # A duration with a unit is not the Unix-time field.
    assert p.time is None
    assert p.extra == {"time_ms": 35.2, "mfu": 12.3}


def test_nanogpt_eval_line_keeps_val_loss_apart():
    p = parse_log_line("step 2000: train loss 1.0432, val loss 1.4712")
    assert (p.step, p.loss) == (2000, 1.0432)
    assert p.extra == {"val_loss": 1.4712}


@pytest.mark.parametrize(
    "line, expected",
    [
        (
            "{'loss': 2.1, 'learning_rate': 0.0002, 'epoch': 0.4}",
            {"loss": 2.1, "lr": 0.0002, "epoch": 0.4},
        ),
        (
            "{'loss': 1.8734, 'grad_norm': tensor(0.5312, device='cuda:0'),"
            " 'learning_rate': 0.00019, 'epoch': 0.41}",
            {"loss": 1.8734, "lr": 0.00019, "epoch": 0.41, "grad_norm": 0.5312},
        ),
        (
            "[default0]:{'loss': 2.0, 'grad_norm': 1.25, 'learning_rate': 1e-05, 'epoch': 1.0}",
            {"loss": 2.0, "lr": 1e-05, "epoch": 1.0, "grad_norm": 1.25},
        ),
        (
            "{'train_runtime': 812.3, 'train_samples_per_second': 24.6,"
            " 'train_steps_per_second': 0.77, 'train_loss': 1.92, 'epoch': 3.0}",
            {
                "loss": 1.92,
                "samples_per_sec": 24.6,
                "epoch": 3.0,
                "train_runtime": 812.3,
                "train_steps_per_second": 0.77,
            },
        ),
        (
            "step 40 | {'loss': 1.5, 'epoch': 0.2}",
            {"step": 40, "loss": 1.5, "epoch": 0.2},
        ),
        (
            '{"step": 3, "loss": 1.25, "done": false}',
            {"step": 3, "loss": 1.25},
        ),
    ],
)
def test_hugging_face_dicts(line, expected):
    assert parse_log_line(line).as_dict() == expected


@pytest.mark.parametrize(
    "line",
    [
        "{'loss': nan, 'grad_norm': nan, 'learning_rate': 0.0002, 'epoch': 0.4}",
        "{'loss': 2.0, 'grad_norm': tensor(nan, device='cuda:0'), 'epoch': 0.4}",
    ],
)
def test_hugging_face_dict_that_ast_cannot_read_falls_back_to_regex(line):
    p = parse_log_line(line)
    assert p.epoch == 0.4
    assert p.loss is not None


def test_hugging_face_nan_loss_is_kept():
    p = parse_log_line("{'loss': nan, 'grad_norm': nan, 'learning_rate': 0.0002, 'epoch': 0.4}")
    assert math.isnan(p.loss)
    assert math.isnan(p.extra["grad_norm"])
    assert p.lr == 0.0002


@pytest.mark.parametrize(
    "line, check",
    [
        ("loss: nan", math.isnan),
        ("step 9 loss NaN", math.isnan),
        ("loss: inf", lambda v: v == math.inf),
        ("loss=-Infinity", lambda v: v == -math.inf),
        ("step 1 loss 1e400", lambda v: v == math.inf),
    ],
)
def test_non_finite_loss_is_a_point(line, check):
    assert check(parse_log_line(line).loss)


def test_progress_bar_postfix_gives_loss():
    p = parse_log_line(
        "Epoch 1:  40%|████      | 20/50 [00:10<00:15,  2.00it/s, loss=2.31, v_num=0]"
    )
    assert (p.epoch, p.loss, p.step) == (1.0, 2.31, None)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "Epoch 1/3",
        "epoch: 2",
        " 10%|█         | 10/100 [00:05<00:45,  2.00it/s]",
        "see https://example.com/run?step=10&loss=2 for details",
        "Downloading https://huggingface.co/gpt2/resolve/main/config.json: 100%",
        "Traceback (most recent call last):",
        '  File "train.py", line 10, in <module>',
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79 GiB)",
        "Saving model checkpoint to out/checkpoint-500",
        "gpu1 r0 | NCCL INFO Using network Socket",
        "{'eval_loss': 2.0, 'eval_runtime': 3.2, 'epoch': 1.0}",
        "took 35.2ms, 12.3% mfu, 1.2.3",
        "warmup_ratio=0.03 weight_decay=0.0",
        *GARBAGE,
    ],
    ids=short,
)
def test_lines_without_step_or_loss_are_not_metrics(line):
    assert parse_log_line(line) is None


@pytest.mark.parametrize(
    "line, step",
    [
        ("step 10.5 loss 2", None),
        ("step 1e3 loss 2", 1000),
        ("gpu12 r3 | step 5 | loss 2.0", 5),
        ("checkpoint-500 step 7 loss 1", 7),
        ("step 99999999999999999999 loss 1", 99999999999999999999),
    ],
)
def test_step_values(line, step):
    assert parse_log_line(line).step == step


def test_first_value_of_a_field_wins():
    p = parse_log_line("step 3 loss 1.0 loss 5.0 step 4")
    assert (p.step, p.loss) == (3, 1.0)


# --- parse_log -----------------------------------------------------------------------------------


def test_parse_log_mixed_text():
    text = "\n".join(
        [
            "gpu1 r0 | UGRO train: world_size=2",
            "gpu1 r0 | step 10 | epoch 1 | loss 2.5000 | lr 3.00e-03 | samples/s 100.0",
            " 50%|█████     | 1/2 [00:01<00:01]\r 100%|██████████| 2/2 [00:02<00:00]",
            "gpu1 r0 | step 20 | epoch 1 | loss 2.2500 | lr 3.00e-03 | samples/s 110.0",
            "Traceback (most recent call last):",
            "\x00\xff",
            "gpu1 r0 | step 30 | epoch 2 | loss nan | lr 3.00e-03 | samples/s 90.0",
            "gpu1 r0 | step 40 | epoch 2 | loss 2.",
        ]
    )
    points = parse_log(text)
    assert [p.step for p in points] == [10, 20, 30, 40]
    assert math.isnan(points[2].loss)
    assert points[3].loss == 2.0


@pytest.mark.parametrize("text", ["", "\n\n", "\r\n", "\n".join(GARBAGE)], ids=short)
def test_parse_log_garbage(text):
    assert parse_log(text) == []


@pytest.mark.parametrize(
    "line, expected",
    [
        (HALF_JSON[0], {"step": 10, "loss": 2.3}),
        (HALF_JSON[1], {"loss": 2.1}),
        (HALF_JSON[2], {"step": 10, "loss": 2.3}),
    ],
)
def test_half_printed_dicts_still_give_their_metrics(line, expected):
    assert parse_log_line(line).as_dict() == expected


def test_parsers_never_raise_on_random_log_like_text():
    rng = random.Random(0)
    alphabet = "stepoliran_/.:=|{}[]()'\",-+eE0123456789 \t\n\r%#\x00\xff█\ud800"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        parse_log(text)
        parse_jsonl(text)


# --- load_metrics --------------------------------------------------------------------------------


def write_logs(job_dir, **files):
    logs = job_dir / "logs"
    logs.mkdir(parents=True)
    for name, text in files.items():
        (logs / f"{name}.log").write_text(text, encoding="utf-8")


def test_load_prefers_jsonl(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(UGRO_JSONL, encoding="utf-8")
    write_logs(tmp_path, gpu1="step 99 | loss 0.1\n")
    assert [p.step for p in load_metrics(tmp_path)] == [10, 20]


@pytest.mark.parametrize("jsonl", [None, "", 'garbage\n{"step"'])
def test_load_falls_back_to_logs_deduplicated_by_step(tmp_path, jsonl):
    if jsonl is not None:
        (tmp_path / "metrics.jsonl").write_text(jsonl, encoding="utf-8")
    write_logs(
        tmp_path,
        gpu1=(
            "gpu1 r0 | step 10 | loss 2.5\n"
            "gpu1 r0 | {'loss': 2.4, 'epoch': 0.5}\n"
            "gpu1 r0 | step 20 | loss 2.2\n"
        ),
        gpu2=(
            "gpu2 r1 | step 10 | loss 2.6\n"
            "gpu2 r1 | step 20 | loss 2.3\n"
            "gpu2 r1 | step 30 | loss 2.0\n"
        ),
    )
    points = load_metrics(tmp_path)
    assert [(p.step, p.loss) for p in points] == [(10, 2.5), (None, 2.4), (20, 2.2), (30, 2.0)]


def test_load_reads_undecodable_bytes(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "gpu1.log").write_bytes(b"\xff\xfe\x00 step 1 | loss 3.0\n\x80\x81\n")
    assert [(p.step, p.loss) for p in load_metrics(tmp_path)] == [(1, 3.0)]


@pytest.mark.parametrize("make_logs", [False, True])
def test_load_nothing(tmp_path, make_logs):
    if make_logs:
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "notes.txt").write_text("step 1 loss 1\n", encoding="utf-8")
    assert load_metrics(tmp_path) == []


# --- summarize -----------------------------------------------------------------------------------

EMPTY_SUMMARY = {
    "steps": None,
    "final_loss": None,
    "best_loss": None,
    "best_step": None,
    "epochs": None,
    "samples_per_sec": None,
}


def test_summarize_empty():
    assert summarize([]) == {**EMPTY_SUMMARY, "points": 0}


def test_summarize_points_without_values():
    assert summarize([MetricPoint(), MetricPoint(extra={"a": 1.0})]) == {
        **EMPTY_SUMMARY,
        "points": 2,
    }


def test_summarize_run():
    points = parse_jsonl(
        '{"step": 10, "epoch": 1, "loss": 2.5, "samples_per_sec": 100}\n'
        '{"step": 20, "epoch": 2, "loss": 1.5, "samples_per_sec": 200}\n'
        '{"step": 30, "epoch": 3, "loss": 1.8}\n'
    )
    assert summarize(points) == {
        "steps": 30,
        "final_loss": 1.8,
        "best_loss": 1.5,
        "best_step": 20,
        "epochs": 3.0,
        "samples_per_sec": 150.0,
        "points": 3,
    }


def test_summarize_diverged_run_ignores_non_finite_for_best_and_mean():
    points = parse_jsonl(
        '{"step": 1, "loss": 2.0, "samples_per_sec": 100}\n'
        '{"step": 2, "loss": -Infinity, "samples_per_sec": Infinity}\n'
        '{"step": 3, "loss": NaN, "samples_per_sec": NaN, "epoch": NaN}\n'
    )
    summary = summarize(points)
    assert math.isnan(summary["final_loss"])
    assert (summary["best_loss"], summary["best_step"]) == (2.0, 1)
    assert summary["samples_per_sec"] == 100.0
    assert summary["epochs"] is None
    assert summary["steps"] == 3


def test_summarize_uses_last_known_values_and_accepts_iterators():
    points = [
        MetricPoint(step=5, loss=3.0),
        MetricPoint(loss=2.0),
        MetricPoint(step=6),
        MetricPoint(epoch=0.5),
    ]
    summary = summarize(iter(points))
    assert (summary["steps"], summary["final_loss"], summary["points"]) == (6, 2.0, 4)
    assert (summary["best_loss"], summary["best_step"]) == (2.0, None)


def test_summarize_is_json_serializable():
    json.dumps(summarize(parse_jsonl(UGRO_JSONL)))


# --- sparkline -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, expected",
    [
        ([], ""),
        ([float("nan"), float("inf"), -math.inf, None], ""),
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], "▁▂▃▄▅▆▇█"),
        ([8, 1], "█▁"),
        ([0.0, float("nan"), 1.0, None, math.inf], "▁█"),
        ([-1e308, 1e308], "▁█"),
        ([5e-324, 1e-323], "▁█"),
    ],
)
def test_sparkline(values, expected):
    assert sparkline(values) == expected


@pytest.mark.parametrize("values", [[2.5], [3.0] * 10, [1e308] * 3])
def test_sparkline_flat_series_is_one_mid_block(values):
    line = sparkline(values)
    assert len(line) == len(values)
    assert set(line) == {"▄"}


def test_sparkline_resamples_to_width():
    values = [float(i) for i in range(1000)]
    line = sparkline(values, width=40)
    assert len(line) == 40
    assert (line[0], line[-1]) == ("▁", "█")
    assert list(line) == sorted(line)


def test_sparkline_short_series_is_not_stretched():
    assert len(sparkline([1.0, 2.0, 3.0], width=40)) == 3


@pytest.mark.parametrize("width, length", [(1, 1), (7, 7), (0, 0), (-3, 0)])
def test_sparkline_width_edges(width, length):
    assert len(sparkline(list(range(50)), width=width)) == length


def test_sparkline_resampling_averages_buckets():
    # Each bucket of two averages to a flat series except the spike's bucket.
    assert sparkline([0, 0, 0, 0, 10, 0, 0, 0], width=4) == "▁▁█▁"


def test_sparkline_of_a_loss_curve():
    losses = [p.loss for p in parse_jsonl(UGRO_JSONL)] + [None, 1.0]
    assert sparkline(losses) == "█▇▁"
