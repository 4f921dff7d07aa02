"""A multi-node launch by hand, in Python: `python benchmarks/fabric_launch.py SSH_CONFIG
COMMAND HOST...` runs COMMAND on every host at once with Fabric's ThreadingGroup, and stays
until every host's command has ended (as pdsh does).

The benchmark's floor for a launcher written in Python: an interpreter, Fabric's imports and
one SSH connection per node, and nothing else (no preflight, no record, no supervisor).
"""

import sys

from fabric import Config, ThreadingGroup


def main() -> int:
    ssh_config, command, *hosts = sys.argv[1:]
    group = ThreadingGroup(*hosts, config=Config(runtime_ssh_path=ssh_config))
    results = group.run(command, hide=True, warn=True, in_stream=False)
    return max((r.exited for r in results.values()), default=0)


if __name__ == "__main__":
    sys.exit(main())
