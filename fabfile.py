"""`fab -H <node> <task>` uses the same tasks as `inv`; see tasks.py."""

from tasks import ns  # noqa: F401
