"""The job that benchmarks/run.py launches: torchrun-compatible, no torch, nothing but the timing.

    --mode exit   end at once (the whole-launch figure is then pure start-up and tear-down)
    --mode hold   print `rank R/W up`, then sleep until stopped (at most --seconds, so a job the
                  benchmark failed to stop still ends by itself)
    --mode spew   print --lines numbered lines as fast as print() goes, then one summary line

Unknown arguments (`inv launch` adds --epochs and --output-dir) are ignored.
"""

import argparse
import os
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("exit", "hold", "spew"), default="exit")
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=300.0)
    args, _ = parser.parse_known_args()
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if args.mode == "hold":
        print(f"rank {rank}/{world} up", flush=True)
        time.sleep(args.seconds)
    elif args.mode == "spew":
        start = time.perf_counter()
        for i in range(args.lines):
            # About as long as a training step line: step, epoch, loss, lr, throughput.
            print(f"spew {rank} {i:06d} | epoch 1 | loss 2.3456 | lr 3.00e-03 | samples/s 1234.5")
        took = time.perf_counter() - start
        print(f"spew-done {rank} {args.lines} lines in {took:.3f} s", flush=True)


if __name__ == "__main__":
    main()
