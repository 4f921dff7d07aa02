"""Fine-tune a causal language model with LoRA under DistributedDataParallel.

The reference job: unsloth/tinyllama-bnb-4bit with LoRA on q_proj/v_proj, trained on wikitext,
its settings in config/training_defaults.yaml (`training:`); every command-line flag overrides the
file. Model and tokenizer come from the Hugging Face hub or a local directory (transformers), the
adapter from peft, the data from the hub (datasets) or a local `.txt` (one record a line) or
`.jsonl` (a `text` field a line). Records are tokenised, joined with EOS between them and cut into
blocks of --seq-len tokens whose labels are their inputs.

With CUDA the model is loaded 4-bit (bitsandbytes, computing in bnb_compute_dtype) when
load_in_4bit asks, and through unsloth when it is installed; without CUDA it trains in float32 on
the CPU over gloo, which is how the tests run it.

One process, no torchrun:

    python scripts/train_production.py --max-steps 20

One node, one rank per GPU:

    torchrun --standalone --nproc-per-node 2 scripts/train_production.py --output-dir runs/lora1

Several nodes: the same command on every node; the first to arrive hosts the c10d rendezvous at
the endpoint ($MASTER_ADDR: the master node's address; a free port):

    torchrun --nnodes 3 --nproc-per-node 1 \\
        --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29500 --rdzv-id lora1 \\
        scripts/train_production.py --output-dir runs/lora1

Only global rank 0 writes, all of it under --output-dir:

    metrics.jsonl                 one JSON object per logged optimizer step:
                                  {"step", "epoch", "loss", "lr", "samples_per_sec", "time"}
    tensorboard/                  the same scalars as TensorBoard events
    checkpoints/epoch_N/          the LoRA adapter (save_pretrained) and trainer_state.pt
                                  (optimizer, scheduler, step, epoch)

and prints one `config: {json}` line, then per logged step a line a parser can rely on, and a
last line when training ends:

    step 10 | epoch 1 | loss 2.3456 | lr 2.00e-04 | samples/s 12.3
    done: epochs=1 final_loss=2.1234

The logged loss is the mean over all ranks and over the optimizer steps since the previous line;
a line is logged every --logging-steps steps and at the end of each epoch. --max-steps ends
training early, the current epoch included, and that epoch is checkpointed. --resume continues
after the latest checkpoint: rank 0 reads it and sends it to every rank, so nodes need no shared
disk. Errors a user can cause (a model or dataset not found, settings that conflict, a GPU out of
memory) end as one `error: ...` line on stderr and exit status 1.
"""

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
import types
import typing
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config" / "training_defaults.yaml"
SEED = 1337
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class UserError(Exception):
    """A failure the user can fix (a name, a path, a setting): reported as one line."""


@dataclass
class TrainConfig:
    """Field names are the YAML's `training:` keys, nested ones joined by `_` (lora.r: lora_r)."""

    model: str
    dataset: str
    dataset_config: str | None = None
    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 1
    grad_accum: int = 1
    seq_len: int = 2048
    load_in_4bit: bool = False
    bnb_compute_dtype: str = "float16"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    tensorboard: bool = True
    checkpoint_every_epoch: bool = True
    output_dir: str = "."
    resume: bool = False
    max_steps: int | None = None

    def __post_init__(self):
        at_least = {"epochs": 1, "batch_size": 1, "grad_accum": 1, "seq_len": 2, "lora_r": 1,
                    "lora_alpha": 1, "warmup_steps": 0, "logging_steps": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise UserError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"max_steps must be at least 1, got {self.max_steps}")
        for name in ("lr", "adam_epsilon", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lora_dropout", "adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise UserError(f"weight_decay must not be negative, got {self.weight_decay}")
        if self.bnb_compute_dtype not in DTYPES:
            raise UserError(f"bnb_compute_dtype must be one of {', '.join(DTYPES)}, "
                            f"got {self.bnb_compute_dtype!r}")
        if not self.lora_target_modules:
            raise UserError("lora_target_modules is empty: name at least one module, e.g. q_proj")
        if not self.model or not self.dataset:
            raise UserError("model and dataset must be set (in the config file or as --model "
                            "and --dataset)")


def _coerce(value, kind, where):
    """value as the field type kind, or a UserError naming where it came from."""
    if isinstance(kind, types.UnionType):
        if value is None:
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind == list[str]:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise UserError(f"{where}: expected a list of names, got {value!r}")
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        # PyYAML reads 2e-4 (no dot) as a string: accept what float() accepts.
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise UserError(f"{where}: expected {kind.__name__}, got {value!r}")


def read_config_file(path):
    """The `training:` section of a YAML file, flattened to TrainConfig field names."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config {path}: no such file (pass --config)") from None
    except yaml.YAMLError as e:
        raise UserError(f"config {path}: not valid YAML: {' '.join(str(e).split())}") from None
    section = (data or {}).get("training") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise UserError(f"config {path}: training: missing or not a mapping")
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    flat = {}
    for key, value in section.items():
        pairs = ([(f"{key}.{k}", f"{key}_{k}", v) for k, v in value.items()]
                 if isinstance(value, dict) else [(key, key, value)])
        for dotted, name, v in pairs:
            where = f"{path}: training.{dotted}"
            if name not in kinds:
                raise UserError(f"{where}: unknown key")
            flat[name] = _coerce(v, kinds[name], where)
    return flat


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Fine-tune a causal LM with LoRA under DDP (settings: --config, then flags)."
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="YAML file whose `training:` section gives the defaults "
                        "(default: config/training_defaults.yaml of this repo)")
    p.add_argument("--model", help="hub name or local directory of a causal LM and its tokenizer")
    p.add_argument("--dataset", help="hub dataset name, or a local .txt (a record a line) or "
                                     ".jsonl (a `text` field a line) file")
    p.add_argument("--dataset-config",
                   help="hub dataset configuration (default: the config file's, when --dataset "
                        "is the config file's dataset)")
    p.add_argument("--epochs", type=int, help="epochs to train in total")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate")
    p.add_argument("--batch-size", type=int, help="sequences per rank per micro-step")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="load the model 4-bit with bitsandbytes (CUDA only; float32 on a CPU)")
    p.add_argument("--bnb-compute-dtype", choices=list(DTYPES),
                   help="dtype the model computes in on a GPU")
    p.add_argument("--lora-r", type=int, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, help="LoRA alpha (scale = alpha / r)")
    p.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input")
    p.add_argument("--lora-target-modules",
                   help="comma-separated module names to adapt, e.g. q_proj,v_proj")
    p.add_argument("--warmup-steps", type=int, help="optimizer steps of linear warmup")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    p.add_argument("--adam-beta1", type=float, help="AdamW beta1")
    p.add_argument("--adam-beta2", type=float, help="AdamW beta2")
    p.add_argument("--adam-epsilon", type=float, help="AdamW epsilon")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping norm")
    p.add_argument("--max-steps", type=int,
                   help="stop after this many optimizer steps in all (smoke runs, tests)")
    p.add_argument("--logging-steps", type=int, help="log every N optimizer steps")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="write TensorBoard events under OUTPUT_DIR/tensorboard")
    p.add_argument("--checkpoint-every-epoch", action=argparse.BooleanOptionalAction,
                   default=None, help="checkpoint after every epoch (else after the last only)")
    p.add_argument("--output-dir", default=os.environ.get("UGRO_JOB_DIR", "."),
                   help="where rank 0 writes metrics.jsonl, tensorboard/ and checkpoints/ "
                        "(default: $UGRO_JOB_DIR, set by inv launch, or .)")
    p.add_argument("--resume", action="store_true",
                   help="continue after the latest checkpoint in OUTPUT_DIR/checkpoints "
                        "(none: start fresh)")
    return p.parse_args(argv)


def resolve_config(argv=None):
    """The config file's values, overridden by every flag given."""
    args = parse_args(argv)
    values = read_config_file(args.config)
    file_dataset = values.get("dataset")
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    for name, value in vars(args).items():
        if name != "config" and value is not None:
            values[name] = _coerce(value, kinds[name], f"--{name.replace('_', '-')}")
    # The file's dataset_config belongs to the file's dataset, not to one given on the command line.
    if args.dataset not in (None, file_dataset) and args.dataset_config is None:
        values["dataset_config"] = None
    missing = [n for n in ("model", "dataset") if n not in values]
    if missing:
        raise UserError(f"{' and '.join(missing)} not set: give --{' and --'.join(missing)} or "
                        f"set them in {args.config}")
    return TrainConfig(**values)


def looks_local(name):
    """True when name is meant as a path: hub ids are `name` or `owner/name`."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def installed_version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_texts(cfg):
    """The dataset's records as strings."""
    path = Path(cfg.dataset).expanduser()
    if path.suffix in (".txt", ".jsonl") or looks_local(cfg.dataset):
        if path.suffix not in (".txt", ".jsonl") or not path.is_file():
            raise UserError(f"dataset {cfg.dataset}: no such .txt or .jsonl file")
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix == ".txt":
            return lines
        texts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"dataset {path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"dataset {path}:{number}: no string `text` field")
            texts.append(record["text"])
        return texts

    try:
        import datasets
    except ImportError:
        raise UserError("the training stack is missing (datasets): "
                        "pip install 'ugro[train]'") from None
    datasets.disable_progress_bars()
    name = cfg.dataset + (f" ({cfg.dataset_config})" if cfg.dataset_config else "")
    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split="train")
    except (OSError, ValueError) as e:
        raise UserError(f"dataset {name} could not be loaded: it is no local .txt or .jsonl "
                        f"file, and the hub may be unreachable (offline?) or the name or its "
                        f"configuration misspelled: {first_line(e)}") from None
    if "text" not in ds.column_names:
        raise UserError(f"dataset {name} has no `text` column (it has: "
                        f"{', '.join(ds.column_names)})")
    return list(ds["text"])


def pack(tokenizer, texts, seq_len):
    """Token blocks of seq_len, shape (n, seq_len): the records end to end, EOS between them."""
    texts = [t for t in texts if t.strip()]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    flat = [token for seq in ids for token in (*seq, *eos)]
    n = len(flat) // seq_len
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def model_not_found(name, error):
    if looks_local(name):
        return UserError(f"model {name}: no such directory, or it holds no model and tokenizer "
                         f"({first_line(error)})")
    return UserError(f"model {name} could not be loaded: no local directory of that name, and "
                     f"the hub may be unreachable (offline?) or the name misspelled: "
                     f"{first_line(error)}")


def load_model(cfg, device, compute_dtype, use_4bit, use_unsloth):
    """(model with LoRA applied, tokenizer)."""
    if use_unsloth:
        from unsloth import FastLanguageModel

        try:
            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=cfg.model, max_seq_length=cfg.seq_len, dtype=compute_dtype,
                load_in_4bit=use_4bit, device_map={"": device.index},
            )
        except OSError as e:
            raise model_not_found(cfg.model, e) from None
        check_target_modules(model, cfg)
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, bias="none",
            use_gradient_checkpointing="unsloth", random_state=SEED,
        )
        return model, tokenizer

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    try:
        model_config = AutoConfig.from_pretrained(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except OSError as e:
        raise model_not_found(cfg.model, e) from None
    # A checkpoint stored 4-bit (unsloth/*-bnb-4bit) loads 4-bit whatever load_in_4bit says.
    prequantized = getattr(model_config, "quantization_config", None) is not None
    if prequantized and device.type != "cuda":
        raise UserError(f"model {cfg.model} is stored quantized and cannot be trained in float32 "
                        f"on a CPU: use its unquantized original")
    # A weightless copy finds a misspelt target module before gigabytes of weights download.
    with torch.device("meta"):
        check_target_modules(AutoModelForCausalLM.from_config(model_config), cfg)
    kwargs = {"dtype": compute_dtype}
    if use_4bit and not prequantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        )
    if use_4bit or prequantized:
        kwargs["device_map"] = {"": device.index}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    except OSError as e:
        raise model_not_found(cfg.model, e) from None
    except ImportError as e:
        raise UserError(f"model {cfg.model} needs a package that is missing: {first_line(e)}") \
            from None
    if use_4bit or prequantized:
        model = prepare_model_for_kbit_training(
            model, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.to(device)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


def check_target_modules(model, cfg):
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.lora_target_modules if t not in present]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if "Linear" in type(module).__name__})
        raise UserError(f"lora_target_modules {','.join(missing)} not in model {cfg.model} "
                        f"(its linear layers: {','.join(linear)})")


def latest_checkpoint(ckpt_dir):
    found = [(int(m[1]), p) for p in ckpt_dir.glob("epoch_*")
             if (m := re.fullmatch(r"epoch_(\d+)", p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def save_checkpoint(peft_model, state, ckpt_dir, epoch):
    """Adapter and trainer state into a temp dir, then renamed: no reader sees half of one."""
    final = ckpt_dir / f"epoch_{epoch}"
    tmp = ckpt_dir / f".epoch_{epoch}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        old = ckpt_dir / f".epoch_{epoch}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def trim_metrics(path, last_step):
    """Drop lines logged after the checkpoint we resume from (and any torn last line), so the
    resumed run's steps continue the file without repeats."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                and record["step"] <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def out_of_memory_message(rank):
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    peak = torch.cuda.max_memory_allocated(index)
    return (f"rank {rank} ran out of GPU memory on cuda:{index} ({props.name}, "
            f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free now, peak allocated by this "
            f"run {peak / 2**30:.1f} GiB): lower --batch-size or --seq-len, or --load-in-4bit")


def train(cfg):
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    is_master = rank == 0

    # Ranks share the machine's cores; torch's default of one thread per core in every rank
    # oversubscribes them and makes CPU runs several times slower.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    use_4bit = cfg.load_in_4bit and cuda
    compute_dtype = DTYPES[cfg.bnb_compute_dtype] if cuda else torch.float32
    use_unsloth = cuda and importlib.util.find_spec("unsloth") is not None
    if world_size > 1:
        dist.init_process_group(backend, device_id=device if cuda else None)

    output_dir = Path(cfg.output_dir)
    ckpt_dir = output_dir / "checkpoints"
    metrics_path = output_dir / "metrics.jsonl"
    if is_master:
        config = {**asdict(cfg), "world_size": world_size, "backend": backend,
                  "device": str(device), "load_in_4bit_active": use_4bit, "unsloth": use_unsloth,
                  **{name: installed_version(name) for name in ("torch", "transformers", "peft")}}
        print(f"config: {json.dumps(config)}", flush=True)
        if cfg.load_in_4bit and not cuda:
            print(f"note: no CUDA: loading {cfg.model} in full precision (float32), not 4-bit",
                  flush=True)

    # A missing local dataset or model fails here, before seconds of imports and minutes of
    # model loading.
    texts = load_texts(cfg)
    if looks_local(cfg.model) and not Path(cfg.model).expanduser().is_dir():
        raise UserError(f"model {cfg.model}: no such directory")
    if use_unsloth:
        # unsloth patches transformers and peft on import, so it must come before them.
        import unsloth  # noqa: F401
    try:
        import transformers
        from peft.utils import load_peft_weights, set_peft_model_state_dict
    except ImportError as e:
        raise UserError(f"the training stack is missing ({e.name}): "
                        f"pip install 'ugro[train]'") from None
    # The bar for loading weights already in memory is noise, and every rank would print it.
    transformers.utils.logging.disable_progress_bar()
    # peft asks every model this deprecated question; a user can do nothing about it.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)

    torch.manual_seed(SEED)
    model, tokenizer = load_model(cfg, device, compute_dtype, use_4bit, use_unsloth)
    blocks = pack(tokenizer, texts, cfg.seq_len)
    # DistributedSampler hands each rank a disjoint shard, reshuffled every epoch by set_epoch.
    sampler = DistributedSampler(blocks, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=SEED, drop_last=True)
    loader = DataLoader(blocks, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise UserError(f"dataset {cfg.dataset} makes {len(blocks)} blocks of {cfg.seq_len} "
                        f"tokens, fewer than batch_size {cfg.batch_size} x {world_size} ranks")
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps,
                                                             total_steps)
    # float16 gradients underflow without loss scaling; bfloat16 and float32 need none.
    scaler = torch.amp.GradScaler("cuda", enabled=compute_dtype == torch.float16)
    autocast = torch.autocast("cuda", dtype=compute_dtype, enabled=cuda)

    # The checkpoint must match the adapter's shape and the model it adapts.
    lineage = {"model": cfg.model, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
               "lora_target_modules": sorted(cfg.lora_target_modules)}
    start_epoch, step, final_loss, resumed_from = 1, 0, float("nan"), None
    if cfg.resume:
        # Rank 0 reads the checkpoint and broadcasts it: every rank resumes from the same state
        # even when the nodes share no disk.
        payload = [None]
        if is_master and (path := latest_checkpoint(ckpt_dir)) is not None:
            payload = [{"path": str(path), "adapter": load_peft_weights(str(path), device="cpu"),
                        **torch.load(path / "trainer_state.pt", map_location="cpu")}]
        if world_size > 1:
            dist.broadcast_object_list(payload, src=0)
        ckpt = payload[0]
        if ckpt is not None:
            differ = [k for k in lineage if ckpt["lineage"].get(k) != lineage[k]]
            if differ:
                was = ", ".join(f"{k}={ckpt['lineage'].get(k)}" for k in differ)
                now = ", ".join(f"{k}={lineage[k]}" for k in differ)
                raise UserError(f"--resume: {ckpt['path']} was trained with {was}, this run "
                                f"asks for {now}")
            set_peft_model_state_dict(model, ckpt["adapter"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt["scaler"]:  # empty when saved by a run that did not scale (CPU, bf16)
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, step, final_loss = ckpt["epoch"] + 1, ckpt["step"], ckpt["loss"]
            resumed_from = ckpt["path"]
    ddp_model = (DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
                 if world_size > 1 else model)

    writer = None
    if is_master:
        n_trainable = sum(p.numel() for p in trainable)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"model: {cfg.model} on {device}, {n_trainable} of {n_all} parameters trainable | "
              f"data: {len(blocks)} blocks of {cfg.seq_len} tokens, {steps_per_epoch} optimizer "
              f"steps per epoch, {total_steps} in all", flush=True)
        if cfg.warmup_steps >= total_steps:
            print(f"note: warmup_steps {cfg.warmup_steps} >= {total_steps} steps in all: the "
                  f"learning rate never reaches {cfg.lr:g}", flush=True)
        if cfg.resume:
            print(f"resume: from {resumed_from}, at epoch {start_epoch} step {step}"
                  if resumed_from else f"resume: no checkpoint in {ckpt_dir}, starting at epoch 1",
                  flush=True)
            trim_metrics(metrics_path, step)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = open(metrics_path, "a" if cfg.resume else "w", encoding="utf-8")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: tensorboard is not installed: no TensorBoard events "
                      "(pip install tensorboard)", flush=True)
            else:
                writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    last_epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        if step >= total_steps:
            break
        sampler.set_epoch(epoch)
        ddp_model.train()
        batches = iter(loader)
        left = len(loader)
        window_loss = torch.zeros((), device=device)
        window_steps, window_samples, window_start = 0, 0, time.perf_counter()
        for i in range(1, steps_per_epoch + 1):
            micro_steps = min(cfg.grad_accum, left)
            left -= micro_steps
            step_loss = torch.zeros((), device=device)
            for k in range(micro_steps):
                x = next(batches).to(device)
                # Gradients are all-reduced once per optimizer step, on its last micro-step.
                no_sync = ddp_model.no_sync if world_size > 1 and k < micro_steps - 1 \
                    else contextlib.nullcontext
                with no_sync():
                    with autocast:
                        loss = ddp_model(input_ids=x, labels=x, use_cache=False).loss
                    scaler.scale(loss / micro_steps).backward()
                step_loss += loss.detach().float() / micro_steps
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_loss += step_loss
            window_steps += 1
            window_samples += micro_steps * cfg.batch_size * world_size

            last = i == steps_per_epoch or step >= total_steps
            if step % cfg.logging_steps and not last:
                continue
            # Every rank reaches this line at the same steps, so the collective cannot hang.
            if world_size > 1:
                dist.all_reduce(window_loss)
            final_loss = window_loss.item() / (window_steps * world_size)
            samples_per_sec = window_samples / (time.perf_counter() - window_start)
            if is_master:
                print(f"step {step} | epoch {epoch} | loss {final_loss:.4f} | lr {lr:.2e} "
                      f"| samples/s {samples_per_sec:.1f}", flush=True)
                record = {"step": step, "epoch": epoch, "loss": final_loss, "lr": lr,
                          "samples_per_sec": samples_per_sec, "time": time.time()}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if writer is not None:
                    for key in ("loss", "lr", "samples_per_sec"):
                        writer.add_scalar(f"train/{key}", record[key], step)
            window_loss.zero_()
            window_steps, window_samples, window_start = 0, 0, time.perf_counter()
            if step >= total_steps:
                break

        last_epoch = epoch
        if is_master and (cfg.checkpoint_every_epoch or epoch == cfg.epochs
                          or step >= total_steps):
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                     "loss": final_loss, "lineage": lineage, "config": asdict(cfg)}
            save_checkpoint(model, state, ckpt_dir, epoch)
        # No rank starts the next epoch before this epoch's checkpoint is on disk, so a job
        # stopped at any later point can resume from it.
        if world_size > 1:
            dist.barrier()

    if is_master:
        metrics_file.close()
        if writer is not None:
            writer.close()
        print(f"done: epochs={last_epoch} final_loss={final_loss:.4f}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()


def main(argv=None):
    try:
        train(resolve_config(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except torch.cuda.OutOfMemoryError:
        print(f"error: {out_of_memory_message(int(os.environ.get('RANK', 0)))}",
              file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
