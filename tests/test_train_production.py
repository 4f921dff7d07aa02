"""scripts/train_production.py, run for real on the CPU: a tiny random Llama and a tokenizer built
here, LoRA, torchrun with 2 ranks (gloo). Nothing touches the network: the hub is switched off."""

import ast
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

# In-process loads below never reach for the hub either; huggingface_hub reads this on import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_production.py"
METRIC_KEYS = {"step", "epoch", "loss", "lr", "samples_per_sec", "time"}
STEP_LINE = re.compile(
    r"step \d+ \| epoch \d+ \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| samples/s \d+\.\d"
)
SENTENCES = ["the cat sat on the mat.", "a dog ran to the park.", "we like to read good books.",
             "the sun is warm today."]
SMALL = ["--seq-len", "32", "--lr", "1e-2", "--grad-accum", "2", "--warmup-steps", "2",
         "--logging-steps", "4"]


def load_script():
    spec = importlib.util.spec_from_file_location("train_production", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env():
    # Gloo picks its interface from the hostname; pin it to loopback. The hub is switched off so
    # that a name that is not a local path fails at once instead of trying the network.
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_script(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=ROOT)


def torchrun(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(SCRIPT), *args],
        capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT,
    )


def read_metrics(path):
    """The records of metrics.jsonl, each checked against the format."""
    text = path.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    for record in records:
        assert set(record) == METRIC_KEYS
        assert isinstance(record["step"], int) and isinstance(record["epoch"], int)
        for key in ("loss", "lr", "samples_per_sec", "time"):
            assert isinstance(record[key], float)
    if (ROOT / "ugro" / "metrics.py").exists():
        from ugro.metrics import parse_jsonl

        points = parse_jsonl(text)
        assert [(p.step, p.epoch, p.loss) for p in points] == \
            [(r["step"], r["epoch"], r["loss"]) for r in records]
    return records


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A random 2-layer Llama with a BPE tokenizer trained here, and a text file to train on."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    lines = [SENTENCES[i % len(SENTENCES)] for i in range(400)]
    (root / "data.txt").write_text("\n".join(lines) + "\n")

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=64, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(root / "model")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        # Wider than the default 0.02, so that the frozen random layers leave the adapter logits
        # it can move, and the loss falls clearly within one short epoch.
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    return root


@pytest.fixture(scope="session")
def first_epoch(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = torchrun("--model", str(tiny / "model"), "--dataset", str(tiny / "data.txt"),
                      "--output-dir", str(out), "--epochs", "1", *SMALL)
    return out, result


# --- settings: in-process, no training stack needed beyond the import guard -----------------


def steps_per_epoch(stdout):
    return int(re.search(r"(\d+) optimizer steps per epoch", stdout)[1])


def logged_steps(first, last, every=4):
    return [s for s in range(first, last + 1) if s % every == 0 or s == last]


def write_config(path, text):
    path.write_text(text)
    return str(path)


def test_the_shipped_defaults_are_the_reference_job():
    cfg = load_script().resolve_config([])
    assert (cfg.model, cfg.dataset, cfg.dataset_config) == \
        ("unsloth/tinyllama-bnb-4bit", "wikitext", "wikitext-2-raw-v1")
    assert (cfg.lr, cfg.batch_size, cfg.grad_accum, cfg.seq_len) == (2e-4, 1, 8, 2048)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.load_in_4bit and cfg.bnb_compute_dtype == "float16"
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon) == (0.9, 0.999, 1e-8)


def test_flags_override_the_file(tmp_path):
    script = load_script()
    cfg = script.resolve_config([
        "--model", "m", "--dataset", "other", "--epochs", "3", "--lr", "1e-3",
        "--batch-size", "2", "--lora-target-modules", "q_proj,k_proj", "--no-load-in-4bit",
        "--max-steps", "5", "--output-dir", str(tmp_path),
    ])
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.batch_size, cfg.max_steps) == ("m", 3, 1e-3, 2, 5)
    assert cfg.lora_target_modules == ["q_proj", "k_proj"]
    assert cfg.load_in_4bit is False and cfg.output_dir == str(tmp_path)
    # wikitext's configuration does not follow the dataset to another name.
    assert cfg.dataset == "other" and cfg.dataset_config is None
    assert script.resolve_config(["--dataset", "wikitext"]).dataset_config == "wikitext-2-raw-v1"


def test_yaml_numbers_without_a_dot_are_read_as_floats(tmp_path):
    path = write_config(tmp_path / "c.yaml",
                        "training:\n  model: m\n  dataset: d\n  lr: 2e-4\n"
                        "  lora:\n    target_modules: q_proj\n")
    cfg = load_script().resolve_config(["--config", path])
    assert cfg.lr == 2e-4 and cfg.lora_target_modules == ["q_proj"]


@pytest.mark.parametrize("text, message", [
    ("training:\n  model: m\n  dataset: d\n  lora:\n    rank: 4\n",
     "training.lora.rank: unknown key"),
    ("training:\n  model: m\n  dataset: d\n  epochs: two\n",
     "training.epochs: expected int, got 'two'"),
    ("launch: {}\n", "training: missing or not a mapping"),
    ("training: [\n", "not valid YAML"),
])
def test_config_file_errors_name_the_field(tmp_path, text, message):
    script = load_script()
    path = write_config(tmp_path / "c.yaml", text)
    with pytest.raises(script.UserError, match=re.escape(message)) as caught:
        script.resolve_config(["--config", path])
    assert path in str(caught.value)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["--seq-len", "1"], "seq_len must be at least 2, got 1"),
    (["--lora-dropout", "1.5"], "lora_dropout must be in [0, 1), got 1.5"),
    (["--lora-target-modules", ","], "lora_target_modules is empty"),
    (["--lr", "0"], "lr must be positive, got 0.0"),
])
def test_conflicting_settings_are_refused(flags, message):
    script = load_script()
    with pytest.raises(script.UserError, match=re.escape(message)):
        script.resolve_config(flags)


def test_a_conflicting_setting_is_one_line_on_stderr():
    result = run_script("--batch-size", "0")
    assert result.returncode == 1
    assert result.stderr == "error: batch_size must be at least 1, got 0\n"


# --- failures a user causes: one line, no traceback -----------------------------------------


def assert_one_error_line(result, *fragments):
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_a_missing_model_is_one_clear_line(tiny, tmp_path):
    result = run_script("--model", str(tmp_path / "no-model"), "--dataset",
                        str(tiny / "data.txt"), "--output-dir", str(tmp_path))
    assert_one_error_line(result, f"model {tmp_path / 'no-model'}: no such directory")
    assert "config: " in result.stdout


def test_a_model_missing_from_an_offline_hub_names_the_hub(tiny, tmp_path):
    result = run_script("--model", "no-such-owner/no-such-model", "--dataset",
                        str(tiny / "data.txt"), "--output-dir", str(tmp_path))
    assert_one_error_line(result, "model no-such-owner/no-such-model could not be loaded",
                          "hub may be unreachable")


def test_a_missing_dataset_is_one_clear_line(tiny, tmp_path):
    result = run_script("--model", str(tiny / "model"), "--dataset", str(tmp_path / "none.txt"),
                        "--output-dir", str(tmp_path))
    assert_one_error_line(result, f"dataset {tmp_path / 'none.txt'}: no such .txt or .jsonl file")


def test_out_of_memory_is_one_line_naming_the_rank_and_its_memory(monkeypatch, capsys):
    import torch

    script = load_script()

    def train(cfg):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    gib = 2**30
    monkeypatch.setattr(script, "train", train)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name="NVIDIA GeForce RTX 3090"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (gib // 4, 24 * gib))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 23 * gib)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(SystemExit) as caught:
        script.main([])
    assert caught.value.code == 1
    assert capsys.readouterr().err == (
        "error: rank 3 ran out of GPU memory on cuda:1 (NVIDIA GeForce RTX 3090, 24.0 GiB, "
        "0.2 GiB free now, peak allocated by this run 23.0 GiB): lower --batch-size or "
        "--seq-len, or --load-in-4bit\n"
    )


# --- loading, in-process ---------------------------------------------------------------------


def config_for(tiny, *flags):
    return load_script().resolve_config(["--model", str(tiny / "model"), "--dataset",
                                         str(tiny / "data.txt"), *flags])


def test_lora_targets_absent_from_the_model_are_named(tiny):
    import torch

    script = load_script()
    cfg = config_for(tiny, "--lora-target-modules", "q_proj,query_key_value")
    with pytest.raises(script.UserError) as caught:
        script.load_model(cfg, torch.device("cpu"), torch.float32, use_4bit=False,
                          use_unsloth=False)
    assert "lora_target_modules query_key_value not in model" in str(caught.value)
    assert "its linear layers: down_proj,gate_proj,k_proj,lm_head,o_proj,q_proj,up_proj," \
        "v_proj" in str(caught.value)


def test_a_checkpoint_stored_quantized_is_refused_on_a_cpu(tiny, tmp_path):
    import torch

    script = load_script()
    shutil.copytree(tiny / "model", tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    cfg = script.resolve_config(["--model", str(tmp_path / "q"), "--dataset", "d.txt"])
    with pytest.raises(script.UserError, match="is stored quantized and cannot be trained in "
                                               "float32 on a CPU"):
        script.load_model(cfg, torch.device("cpu"), torch.float32, use_4bit=False,
                          use_unsloth=False)


def test_jsonl_records_are_their_text_fields(tmp_path):
    script = load_script()
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    cfg = script.resolve_config(["--model", "m", "--dataset", str(path)])
    assert script.load_texts(cfg) == ["one", "two"]
    path.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(script.UserError, match=re.escape(f"{path}:2: no string `text` field")):
        script.load_texts(cfg)


def test_a_hub_dataset_is_its_train_split_text_column(monkeypatch):
    datasets = pytest.importorskip("datasets")
    script = load_script()
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["a b", "", "c"], "n": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = script.resolve_config(["--model", "m"])
    assert script.load_texts(cfg) == ["a b", "", "c"]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train")]


def test_records_are_packed_into_blocks_with_eos_between(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("the cat", "a dog")]
    stream = ids[0] + [tokenizer.eos_token_id] + ids[1] + [tokenizer.eos_token_id]
    blocks = load_script().pack(tokenizer, ["the cat", "  ", "a dog"], 3)
    assert blocks.shape == (len(stream) // 3, 3)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]


def imported_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_the_script_and_the_orchestrator_stay_apart():
    # The script runs on workers without ugro; ugro runs on the head node without the stack.
    assert not [m for m in imported_modules(SCRIPT) if m.split(".")[0] == "ugro"]
    stack = {"transformers", "peft", "datasets", "accelerate", "bitsandbytes", "unsloth"}
    for path in (ROOT / "ugro").glob("*.py"):
        assert not [m for m in imported_modules(path) if m.split(".")[0] in stack], path


# --- training, for real ---------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_train_log_and_checkpoint(first_epoch):
    out, result = first_epoch
    assert result.returncode == 0, result.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == logged_steps(1, steps_per_epoch(result.stdout))
    assert {r["epoch"] for r in records} == {1}
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(r["samples_per_sec"] > 0 for r in records)

    lines = result.stdout.splitlines()
    config = json.loads(next(line for line in lines if line.startswith("config: "))[8:])
    assert config["world_size"] == 2 and config["backend"] == "gloo" and config["lr"] == 1e-2
    # Rank 0 alone prints.
    assert sum(line.startswith("config: ") for line in lines) == 1
    assert "note: no CUDA: loading" in result.stdout and "float32" in result.stdout
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == len(records) and all(STEP_LINE.fullmatch(s) for s in step_lines)
    assert lines[-1] == f"done: epochs=1 final_loss={records[-1]['loss']:.4f}"

    ckpt = out / "checkpoints" / "epoch_1"
    assert (ckpt / "adapter_config.json").exists() and (ckpt / "trainer_state.pt").exists()
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 16
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1"]
    if importlib.util.find_spec("tensorboard"):
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_continues_the_steps_in_the_next_epoch(first_epoch, tiny, tmp_path):
    out, result = first_epoch
    assert result.returncode == 0, result.stderr
    first = steps_per_epoch(result.stdout)
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    # Lines from a run that died after the checkpoint must not survive the resume.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": first + 2, "epoch": 2, "loss": 9.0, "lr": 0.01,
                            "samples_per_sec": 1.0, "time": 1.0}) + '\n{"step": 3')

    # --max-steps ends epoch 2 part way.
    resumed = torchrun("--model", str(tiny / "model"), "--dataset", str(tiny / "data.txt"),
                       "--output-dir", str(tmp_path), "--epochs", "2",
                       "--max-steps", str(first + 11), "--resume", *SMALL)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume: from {tmp_path / 'checkpoints' / 'epoch_1'}, at epoch 2 step {first}" \
        in resumed.stdout
    records = read_metrics(tmp_path / "metrics.jsonl")
    before = read_metrics(out / "metrics.jsonl")
    assert records[: len(before)] == before
    assert [r["step"] for r in records[len(before):]] == logged_steps(first + 1, first + 11)
    assert {r["epoch"] for r in records[len(before):]} == {2}
    # Continuing from the trained adapter, not from scratch.
    assert records[-1]["loss"] < before[0]["loss"] - 1.0
    assert (tmp_path / "checkpoints" / "epoch_2" / "adapter_config.json").exists()
    assert resumed.stdout.splitlines()[-1] == \
        f"done: epochs=2 final_loss={records[-1]['loss']:.4f}"


@pytest.mark.slow
def test_one_process_without_torchrun(tiny, tmp_path):
    result = run_script("--model", str(tiny / "model"), "--dataset", str(tiny / "data.txt"),
                        "--output-dir", str(tmp_path), "--epochs", "2", "--max-steps", "3",
                        "--logging-steps", "1", "--seq-len", "32", "--no-tensorboard")
    assert result.returncode == 0, result.stderr
    assert [(r["step"], r["epoch"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == \
        [(1, 1), (2, 1), (3, 1)]
    # --max-steps cut epoch 1 short, and that epoch is checkpointed.
    assert (tmp_path / "checkpoints" / "epoch_1" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "tensorboard").exists()
    assert result.stdout.splitlines()[-1].startswith("done: epochs=1 final_loss=")


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_adapter_shape(first_epoch, tiny, tmp_path):
    out, result = first_epoch
    assert result.returncode == 0, result.stderr
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    refused = run_script("--model", str(tiny / "model"), "--dataset", str(tiny / "data.txt"),
                         "--output-dir", str(tmp_path), "--epochs", "2", "--seq-len", "32",
                         "--lora-r", "8", "--resume")
    assert_one_error_line(refused, f"--resume: {tmp_path / 'checkpoints' / 'epoch_1'} was "
                                   "trained with lora_r=16, this run asks for lora_r=8")
    assert (tmp_path / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()


@pytest.mark.slow
@pytest.mark.lab
def test_inv_launch_runs_it_on_two_lab_nodes(tiny, lab, inv, tmp_path):
    """The production script through `inv launch`, torchrun over two sshd lab nodes."""
    nodes = lab.nodes[:2]
    overrides = {}
    for node in nodes:
        project = tmp_path / f"{node.name}-project"
        for part in ("scripts", "config"):
            shutil.copytree(ROOT / part, project / part)
        overrides[node.name] = {"project_path": str(project), "env": {
            "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    cluster = lab.cluster_file(tmp_path / "lab.yaml", nodes, node_overrides=overrides)
    r = inv("launch", "--name", "lora", "--script", "scripts/train_production.py",
            "--nproc-per-node", "1", "--epochs", "1", "--model", str(tiny / "model"),
            "--dataset", str(tiny / "data.txt"), "--script-args",
            " ".join([*SMALL, "--max-steps", "4", "--no-tensorboard"]),
            cluster=cluster, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    (job,) = (inv.data / "experiments").iterdir()
    assert json.loads((job / "metadata.json").read_text())["status"] == "COMPLETED"
    metrics = read_metrics(job / "metrics.jsonl")
    assert metrics and all(math.isfinite(m["loss"]) for m in metrics)
    assert "falls back to full precision" in r.stdout or "float32" in r.stdout
    adapters = [p for node in nodes for p in
                (tmp_path / f"{node.name}-project" / "data/experiments" / job.name
                 / "checkpoints").glob("epoch_1/adapter_config.json")]
    assert len(adapters) == 1  # rank 0's node holds the adapter
