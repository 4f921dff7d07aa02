"""Train a tiny character-level language model with DistributedDataParallel.

The smallest real DDP job UGRO launches: plain torch, a ~40k-parameter GRU on a small text that
ships with the repo (scripts/data/tiny_shakespeare.txt). It runs on CPUs (gloo) and on GPUs
(nccl, one rank per GPU), so a multi-node launch can be tried end to end in seconds.

One process, no torchrun (world size 1):

    python scripts/train_single_test.py --epochs 3

One node, two ranks:

    torchrun --standalone --nproc-per-node 2 scripts/train_single_test.py --epochs 3

Several nodes: run the same command on every node, changing nothing; the first node to arrive
hosts the c10d rendezvous at the endpoint ($MASTER_ADDR: the master node's address; a free port):

    torchrun --nnodes 3 --nproc-per-node 1 \\
        --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:29500 --rdzv-id exp1 \\
        scripts/train_single_test.py --epochs 3 --output-dir runs/exp1

Only global rank 0 writes, all of it under --output-dir:

    metrics.jsonl            one JSON object per logged step:
                             {"step", "epoch", "loss", "lr", "samples_per_sec", "time"}
    checkpoints/epoch_N.pt   model, optimizer, epoch and step after each epoch

and prints one `config: {json}` line, then per logged step a line a parser can rely on:

    step 10 | epoch 1 | loss 2.3456 | lr 3.00e-03 | samples/s 1234.5

The logged loss is the mean over all ranks and over the steps since the previous line. `--resume`
continues after the latest checkpoint: rank 0 reads it and sends it to every rank, so nodes need no
shared disk.
"""

import argparse
import itertools
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

BUILTIN_CORPUS = Path(__file__).resolve().parent / "data" / "tiny_shakespeare.txt"
# The launcher's generic --dataset values; this script has one small corpus and uses it for both.
BUILTIN_NAMES = ("builtin", "wikitext")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a tiny character-level language model with DDP (CPU or GPU)."
    )
    p.add_argument("--epochs", type=positive_int, default=3, help="epochs to train in total")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="sequences per rank per step"
    )
    p.add_argument("--seq-len", type=positive_int, default=64, help="characters per sequence")
    p.add_argument(
        "--steps-per-epoch", type=positive_int, default=100,
        help="cap on optimizer steps per epoch (a full pass over the corpus is longer)",
    )
    p.add_argument("--log-every", type=positive_int, default=5, help="log every N steps")
    p.add_argument("--seed", type=int, default=1337, help="seed for weights and data order")
    p.add_argument(
        "--output-dir", default=os.environ.get("UGRO_JOB_DIR", "."),
        help="where rank 0 writes metrics.jsonl and checkpoints/ "
             "(default: $UGRO_JOB_DIR, which inv launch sets, or .)",
    )
    p.add_argument(
        "--resume", action="store_true",
        help="continue after the latest checkpoint in OUTPUT_DIR/checkpoints (none: start fresh)",
    )
    p.add_argument("--model", default="char-gru", help="free label, recorded in the config line")
    p.add_argument(
        "--dataset", default="builtin",
        help=f"a text file, or one of {', '.join(BUILTIN_NAMES)} for the shipped corpus",
    )
    p.add_argument(
        "--crash-at-step", type=positive_int, default=None,
        help="test hook: rank --crash-rank exits with status 3 at this global step",
    )
    p.add_argument("--crash-rank", type=int, default=0, help="test hook: the rank that crashes")
    p.add_argument(
        "--sleep-per-step", type=float, default=0.0,
        help="test hook: sleep this many seconds after each step, to make a run last",
    )
    args = p.parse_args(argv)
    if args.dataset in BUILTIN_NAMES:
        args.dataset_path = str(BUILTIN_CORPUS)
    elif Path(args.dataset).is_file():
        args.dataset_path = str(Path(args.dataset).resolve())
    else:
        p.error(f"--dataset {args.dataset}: no such file")
    return args


class CharWindows(Dataset):
    """Every window of seq_len + 1 characters: the input is its first seq_len, the target the
    same shifted by one."""

    def __init__(self, ids, seq_len):
        self.ids = ids
        self.seq_len = seq_len

    def __len__(self):
        return len(self.ids) - self.seq_len

    def __getitem__(self, i):
        window = self.ids[i : i + self.seq_len + 1]
        return window[:-1], window[1:]


class CharGRU(nn.Module):
    def __init__(self, vocab_size, embed_dim=32, hidden_dim=96):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.gru = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, x):
        hidden, _ = self.gru(self.embed(x))
        return self.head(hidden)


def latest_checkpoint(ckpt_dir):
    found = [(int(m[1]), p) for p in ckpt_dir.glob("epoch_*.pt")
             if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name))]
    return max(found)[1] if found else None


def save_atomically(obj, path):
    """torch.save to a temp file and rename it, so a reader never sees half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def trim_metrics(path, last_step):
    """Drop lines logged after the checkpoint we resume from (and any torn last line), so the
    resumed run's steps continue the file without repeats."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                and record["step"] <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    is_master = rank == 0

    # Ranks share the machine's cores; torch's default of one thread per core in every rank
    # oversubscribes them and makes CPU runs several times slower.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)

    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world_size > 1:
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    # Every rank says it joined: the one line that shows a multi-node job is whole.
    print(f"rank {rank}/{world_size} up on {socket.gethostname()} ({backend}, {device})",
          flush=True)

    text = Path(args.dataset_path).read_text(encoding="utf-8")
    vocab = sorted(set(text))
    if len(text) <= args.seq_len + 1:
        sys.exit(f"--dataset {args.dataset}: {len(text)} characters, need more than --seq-len")
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text])
    dataset = CharWindows(ids, args.seq_len)
    # DistributedSampler hands each rank a disjoint shard, reshuffled every epoch by set_epoch.
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    steps_per_epoch = min(len(loader), args.steps_per_epoch)

    torch.manual_seed(args.seed)
    model = CharGRU(len(vocab)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    output_dir = Path(args.output_dir)
    ckpt_dir = output_dir / "checkpoints"
    metrics_path = output_dir / "metrics.jsonl"
    if is_master:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    start_epoch, step, final_loss, resumed_from = 1, 0, float("nan"), None
    if args.resume:
        # Rank 0 reads the checkpoint and broadcasts it: every rank resumes from the same state
        # even when the nodes share no disk.
        payload = [None]
        if is_master and (path := latest_checkpoint(ckpt_dir)) is not None:
            payload = [{"path": str(path), **torch.load(path, map_location="cpu")}]
        if world_size > 1:
            dist.broadcast_object_list(payload, src=0)
        ckpt = payload[0]
        if ckpt is not None:
            if ckpt["vocab"] != vocab:
                sys.exit(f"--resume: {ckpt['path']} was trained on another text than "
                         f"{args.dataset_path}")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            start_epoch, step, final_loss = ckpt["epoch"] + 1, ckpt["step"], ckpt["loss"]
            resumed_from = ckpt["path"]
        if is_master:
            trim_metrics(metrics_path, step)

    ddp_model = DistributedDataParallel(model) if world_size > 1 else model

    if is_master:
        config = {
            **vars(args),
            "world_size": world_size,
            "backend": backend if world_size > 1 else None,
            "device": str(device),
            "vocab_size": len(vocab),
            "parameters": sum(p.numel() for p in model.parameters()),
            "effective_steps_per_epoch": steps_per_epoch,
            "resumed_from": resumed_from,
        }
        print(f"config: {json.dumps(config)}", flush=True)
        if resumed_from is not None:
            print(f"resume: {resumed_from} (epoch {start_epoch - 1}, step {step})", flush=True)
        elif args.resume:
            print(f"resume: no checkpoint in {ckpt_dir}, starting at epoch 1", flush=True)
        metrics_file = open(metrics_path, "a" if args.resume else "w", encoding="utf-8")

    for epoch in range(start_epoch, args.epochs + 1):
        sampler.set_epoch(epoch)
        ddp_model.train()
        loss_sum = torch.zeros((), device=device)
        window_steps, window_start = 0, time.perf_counter()
        for i, (x, y) in enumerate(itertools.islice(loader, steps_per_epoch), start=1):
            step += 1
            if step == args.crash_at_step and rank == args.crash_rank:
                print(f"crash-at-step: rank {rank} exits with status 3 at step {step}",
                      file=sys.stderr, flush=True)
                sys.exit(3)
            x, y = x.to(device), y.to(device)
            logits = ddp_model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if args.sleep_per_step:
                time.sleep(args.sleep_per_step)
            loss_sum += loss.detach()
            window_steps += 1

            if step % args.log_every and i < steps_per_epoch:
                continue
            # Every rank reaches this line at the same steps, so the collective cannot hang.
            if world_size > 1:
                dist.all_reduce(loss_sum)
            final_loss = loss_sum.item() / (window_steps * world_size)
            elapsed = time.perf_counter() - window_start
            samples_per_sec = window_steps * args.batch_size * world_size / elapsed
            lr = optimizer.param_groups[0]["lr"]
            if is_master:
                print(f"step {step} | epoch {epoch} | loss {final_loss:.4f} | lr {lr:.2e} "
                      f"| samples/s {samples_per_sec:.1f}", flush=True)
                record = {"step": step, "epoch": epoch, "loss": final_loss, "lr": lr,
                          "samples_per_sec": samples_per_sec, "time": time.time()}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            loss_sum.zero_()
            window_steps, window_start = 0, time.perf_counter()

        if is_master:
            save_atomically(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "step": step, "loss": final_loss, "vocab": vocab,
                 "config": vars(args)},
                ckpt_dir / f"epoch_{epoch}.pt",
            )
        # No rank starts the next epoch before this epoch's checkpoint is on disk, so a job
        # stopped at any later point can resume from it.
        if world_size > 1:
            dist.barrier()

    if is_master:
        metrics_file.close()
        print(f"done: epochs={args.epochs} final_loss={final_loss:.4f}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
