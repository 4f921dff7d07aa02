"""`ugro` (and `python -m ugro`): the same tasks as `inv` from the checkout, for installed use.

Run it from a project directory (the one holding config/cluster.yaml); settings
come from the same INVOKE_UGRO_* variables and ~/.invoke.yaml as under `inv`.
"""

import sys

from invoke import Program

from .tasks import common, ns


def main() -> None:
    common.PROGRAM = "ugro"
    Program(namespace=ns, name="UGRO", binary="ugro", version="0.1.0").run()


if __name__ == "__main__":
    sys.exit(main())
