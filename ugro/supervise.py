"""The job supervisor: `python -m ugro.supervise --data-dir D --cluster F JOB_ID`.

`inv launch` starts it in its own session, so fail-fast and the final record
keep working when the user's terminal closes or the launcher is killed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import load_cluster
from .errors import UgroError
from .jobs import Jobs
from .launch import Monitor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ugro.supervise")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--grace", type=float, default=3.0)
    parser.add_argument("job_id")
    args = parser.parse_args(argv)
    try:
        cluster = load_cluster(args.cluster)
        meta = Monitor(Jobs(args.data_dir), cluster, args.job_id, args.grace).run()
    except UgroError as exc:
        print(f"ugro.supervise: {exc}", file=sys.stderr)
        return 1
    print(f"{args.job_id}: {meta['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
