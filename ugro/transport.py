"""One SSH connection to one node, built in one place.

Every SSH connection comes from `connect()`: the node's user, port and key from
the cluster file, `~/.ssh/config` honoured under `inv` as well as `fab`
(Fabric skips it under `inv`, fabric#2111), and host keys checked against
known_hosts. Fabric's default accepts any key (`AutoAddPolicy`); UGRO refuses
an unknown or changed one and says how to trust it. A `local: true` node is the
control node itself and runs through Invoke's local runner, no SSH. The socket
under each connection answers promptly (`_PromptSocket`). `describe_failure`
turns whatever a connection raised into one line.

Fabric and paramiko are imported only here and only when a connection is
made, so `inv --list` stays fast.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

from invoke import Context

from .config import Cluster, Node
from .errors import UgroError


def quiet_paramiko() -> None:
    """Paramiko logs its transport thread's tracebacks ("No existing session" and the like)
    through `logging`, which with no handler prints them on the user's terminal; UGRO reports
    each failure itself, as one line."""
    import logging

    log = logging.getLogger("paramiko")
    if not log.handlers:
        log.addHandler(logging.NullHandler())
        log.propagate = False


class HostKeyError(UgroError):
    pass


class NodeUnreachable(UgroError):
    pass


def fingerprint(key) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(node: Node) -> str:
    return node.host if node.port == 22 else f"[{node.host}]:{node.port}"


def _refuse_policy(node: Node, known_hosts: Path):
    import paramiko

    class RefuseUnknown(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            raise HostKeyError(
                f"{node.name}: unknown host key for {known_hosts_name(node)} "
                f"({key.get_name()} {fingerprint(key)}) not in {known_hosts}; "
                f"if that is the node's key, run: inv trust-hosts --nodes {node.name}"
            )

    return RefuseUnknown()


def preload() -> None:
    """Import Fabric and paramiko now (a launch does, before it forks its supervisor)."""
    import fabric  # noqa: F401
    import paramiko  # noqa: F401


def _user_ssh_config():
    import paramiko

    cfg = paramiko.SSHConfig()
    path = Path(os.path.expanduser("~/.ssh/config"))
    if path.is_file():
        with path.open() as f:
            cfg.parse(f)
    return cfg


def connect(node: Node, cluster: Cluster, timeout: float | None = None) -> Context:
    """A Context for `node`: local for the control node, else a verified SSH Connection."""
    if node.local:
        return Context()
    from fabric import Config

    quiet_paramiko()
    timeout = timeout or cluster.health_timeout
    config = Config(ssh_config=_user_ssh_config(), overrides={"timeouts": {"connect": timeout}})
    connect_kwargs: dict[str, Any] = {"banner_timeout": timeout, "auth_timeout": timeout}
    if node.identity_file:
        connect_kwargs["key_filename"] = [node.identity_file]
    cx = _connection_class()(
        node.host,
        user=node.user,
        port=node.port,
        config=config,
        connect_timeout=timeout,
        connect_kwargs=connect_kwargs,
    )
    known_hosts = cluster.known_hosts_path
    cx.client.set_missing_host_key_policy(_refuse_policy(node, known_hosts))
    if known_hosts.is_file():
        cx.client.load_host_keys(str(known_hosts))
    return cx


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class _PromptSocket(socket.socket):
    """A TCP socket for SSH's small request/answer exchanges: Nagle's algorithm off, and
    (Linux) each received segment acknowledged at once instead of after the delayed-ACK
    timer. With either left as the kernel has it, an answer that sshd had ready waited for
    an ACK that waited for the timer: 40 ms for a connection's first command and for each
    exec without TCP_NODELAY (an exec took ~45 ms on loopback, 4 ms like this)."""

    def recv(self, *args):
        data = super().recv(*args)
        if _QUICKACK is not None:
            self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # the kernel resets it
        return data


def _tcp(host: str, port: int, timeout: float | None) -> socket.socket:
    """A connected `_PromptSocket` to the first address of host:port that answers."""
    error: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port,
                                                              type=socket.SOCK_STREAM):
        sock = _PromptSocket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error or OSError(f"{host}: no address to connect to")


@functools.cache
def _connection_class():
    """Fabric's Connection over a `_PromptSocket` (a connection through a ProxyJump or
    ProxyCommand from ssh_config goes through Fabric's gateway as before)."""
    from fabric import Connection

    class PromptConnection(Connection):
        def open(self):
            if self.is_connected or self.gateway:
                return super().open()
            sock = _tcp(self.host, self.port, self.connect_timeout)
            self.connect_kwargs = {**self.connect_kwargs, "sock": sock}
            try:
                return super().open()
            except BaseException:
                sock.close()
                raise

    return PromptConnection


def describe_failure(node: Node, exc: BaseException) -> str:
    """One line saying why a node could not be reached or did not answer."""
    import paramiko
    from invoke.exceptions import CommandTimedOut

    if isinstance(exc, UgroError):
        return str(exc)
    if isinstance(exc, paramiko.BadHostKeyException):
        return (
            f"{node.name}: host key CHANGED for {known_hosts_name(node)} "
            f"(now {exc.key.get_name()} {fingerprint(exc.key)}, known_hosts has "
            f"{fingerprint(exc.expected_key)}); if the node was reinstalled, run: "
            f"inv trust-hosts --nodes {node.name} --replace"
        )
    if isinstance(exc, paramiko.AuthenticationException):
        return f"{node.name}: SSH authentication failed for {node.user}@{node.address}"
    if isinstance(exc, CommandTimedOut):
        return f"{node.name}: no answer within {exc.timeout:g}s"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"{node.name}: {node.address} did not answer (timed out)"
    if isinstance(exc, (paramiko.ssh_exception.NoValidConnectionsError,
                        ConnectionRefusedError)):
        return f"{node.name}: cannot connect to {node.address} (connection refused)"
    if isinstance(exc, paramiko.SSHException) and (
            "banner" in str(exc) or "No existing session" in str(exc)):
        # An sshd that accepts the TCP connection and then says nothing: hung or overloaded.
        return f"{node.name}: {node.address} accepted the connection but its sshd did not answer"
    if isinstance(exc, (OSError, paramiko.SSHException, EOFError)):
        return f"{node.name}: {node.address}: {exc or type(exc).__name__}"
    raise exc


def scan_host_key(node: Node, timeout: float):
    """Fetch the key a node's sshd presents (no authentication)."""
    import paramiko

    quiet_paramiko()
    transport = paramiko.Transport(_tcp(node.host, node.port, timeout))
    try:
        transport.banner_timeout = timeout
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    finally:
        transport.close()
