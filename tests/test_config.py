"""The cluster file: the shipped configs, expansion, and one-line errors that name the field."""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

import pytest
import yaml

from ugro.config import Cluster, ConfigError, Node, PythonEnv, load_cluster, parse_cluster
from ugro.errors import UgroError

ROOT = Path(__file__).resolve().parents[1]
SRC = Path("c.yaml")

PIXI = PythonEnv(strategy="pixi", pixi_env="default")
IFACES = {"NCCL_SOCKET_IFNAME": "eno1", "GLOO_SOCKET_IFNAME": "eno1"}

# A minimal valid file; the error tests each break one thing in a copy of it.
MINIMAL = """\
master: {name: m, local: true}
workers:
  - {name: a, ip: 127.0.1.1}
  - {name: b, ip: 127.0.1.2}
"""


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A known $USER and $HOME, so `${USER}` and `~` expand to known values."""
    monkeypatch.setenv("USER", "tester")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def parse(text: str, project_root: Path | None = None) -> Cluster:
    return parse_cluster(text, SRC, project_root)


def error(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(text)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{SRC}: ")
    return message


def test_shipped_local_cluster():
    c = load_cluster("config/cluster.yaml", ROOT)
    assert c == Cluster(
        name="local",
        source=ROOT / "config" / "cluster.yaml",
        nodes=(
            Node(name="local", host="127.0.0.1", user="tester", project_path=str(ROOT),
                 python=PythonEnv(command=sys.executable), gpus=0, cpu_procs=2, rank=0, local=True),
        ),
        master=c.nodes[0],
        master_port=29500,
        rdzv_backend="static",
        health_timeout=5.0,
    )
    assert c.master.procs == 2
    assert c.master.python.argv() == [sys.executable]


def test_homelab_example_is_the_reference_cluster(home):
    c = load_cluster("config/examples/homelab.yaml", ROOT)
    key = str(home / ".ssh" / "id_ed25519")
    master = Node(
        name="gpu-master", host="192.168.1.100", user="tester",
        project_path=str(home / "projects" / "UGRO"), python=PIXI, gpus=1, rank=0,
        local=True, env=IFACES, gpu_model="RTX 5070 Ti 12 GB",
    )
    gpu1 = Node(
        name="gpu1", host="192.168.1.101", user="ob", port=22, identity_file=key,
        project_path="/home/ob/projects/UGRO", python=PIXI, gpus=1, rank=1,
        env=IFACES, gpu_model="RTX 4070 8 GB",
    )
    gpu2 = Node(
        name="gpu2", host="192.168.1.102", user="ollie", port=22, identity_file=key,
        project_path="/home/ollie/projects/UGRO", python=PIXI, gpus=1, rank=2,
        env=IFACES, gpu_model="RTX 3070 Ti 8 GB",
    )
    assert c.nodes == (master, gpu1, gpu2)
    assert c.master == master
    assert (c.name, c.master_port, c.rdzv_backend) == ("homelab", 29500, "static")
    assert (c.health_timeout, c.port_policy) == (5.0, "next-free")
    assert c.known_hosts_path == home / ".ssh" / "known_hosts"
    # Its `training:` section is the reference job, read by train_production.py --config.
    training = yaml.safe_load((ROOT / "config/examples/homelab.yaml").read_text())["training"]
    assert training["model"] == "unsloth/tinyllama-bnb-4bit"
    assert training["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05,
                                "target_modules": ["q_proj", "v_proj"]}
    assert (training["batch_size"], training["grad_accum"], training["seq_len"]) == (1, 8, 2048)
    assert gpu1.python.argv() == ["pixi", "run", "--frozen", "-e", "default", "python"]
    assert [n.procs for n in c.nodes] == [1, 1, 1]
    assert gpu1.address == "192.168.1.101"


def test_user_expands_from_environment_or_passwd(monkeypatch):
    text = "master: {name: m, local: true, user: '${USER}', env: {WHO: '$USER-x'}}\n"
    assert parse(text).master.user == "tester"
    assert parse(text).master.env == {"WHO": "tester-x"}
    monkeypatch.delenv("USER")
    me = pwd.getpwuid(os.getuid()).pw_name
    assert parse(text).master.user == me
    assert parse("master: {name: m, local: true}\n").master.user == me


def test_tilde_expands_only_on_local_nodes(home):
    c = parse(
        "master: {name: m, local: true, project_path: ~/p}\n"
        "workers:\n"
        "  - {name: a, ip: 127.0.1.1, project_path: ~/projects/UGRO, identity_file: ~/.ssh/k}\n"
    )
    assert c.master.project_path == str(home / "p")
    # The node's own shell expands it (commands.rpath): the control node's home is wrong there.
    assert c.node("a").project_path == "~/projects/UGRO"
    assert c.node("a").identity_file == str(home / ".ssh" / "k")  # a key on the control node


def test_relative_local_project_path_is_the_checkout(tmp_path):
    c = parse(MINIMAL.replace("local: true", "local: true, project_path: sub"), tmp_path)
    assert c.master.project_path == str(tmp_path / "sub")
    assert c.nodes[0] == c.master
    assert parse(MINIMAL).master.project_path == "."


def test_defaults_and_ranks():
    c = parse(MINIMAL)
    assert [(n.name, n.rank) for n in c.nodes] == [("m", 0), ("a", 1), ("b", 2)]
    assert c.node("a") == Node(name="a", host="127.0.1.1", user="tester", rank=1)
    assert c.name == "c"  # the file's stem
    c = parse("master: {name: m, ip: 127.0.1.9, train: false}\n"
              "workers:\n  - {name: a, ip: 127.0.1.1}\n  - {name: b, ip: 127.0.1.2}\n")
    assert [(n.name, n.rank) for n in c.nodes] == [("a", 0), ("b", 1)]
    assert c.master.name == "m"


def test_explicit_ranks_order_the_nodes():
    c = parse("master: {name: m, local: true, rank: 2}\n"
              "workers:\n  - {name: a, ip: 127.0.1.1, rank: 1}\n"
              "  - {name: b, ip: 127.0.1.2, rank: 0}\n")
    assert [n.name for n in c.nodes] == ["b", "a", "m"]


def test_python_forms():
    assert parse("master: {name: m, local: true, python: /opt/py/bin/python3}\n").master.python \
        == PythonEnv(command="/opt/py/bin/python3")
    venv = parse("master: {name: m, local: true, python: {strategy: venv, venv: env/}}\n")
    assert venv.master.python.argv() == ["env/bin/python"]
    assert PythonEnv().argv() == ["python3"]


def test_select_keeps_rank_order():
    c = parse(MINIMAL)
    assert [n.name for n in c.select("b,a")] == ["a", "b"]
    assert [n.name for n in c.select(" b , m ,")] == ["m", "b"]
    assert c.select("") == c.nodes
    assert c.select(None) == c.nodes


def test_select_unknown_node():
    with pytest.raises(UgroError) as exc:
        parse(MINIMAL).select("a,gpu9")
    assert str(exc.value) == "unknown node 'gpu9' (this cluster has: m, a, b)"


def test_procs_and_address():
    assert Node(name="n", host="h", user="u", gpus=2, cpu_procs=4).procs == 2
    assert Node(name="n", host="h", user="u", cpu_procs=4).procs == 4
    assert Node(name="n", host="h", user="u").procs == 1
    assert Node(name="n", host="h", user="u", port=2222).address == "h:2222"


@pytest.mark.parametrize("port", ["0", "70000", '"abc"', "true", "-1", "22.5"])
def test_bad_ssh_port(port):
    text = MINIMAL.replace("ip: 127.0.1.1}", f"ip: 127.0.1.1, ssh_port: {port}}}")
    assert error(text) == "c.yaml: workers[0].ssh_port: not a port"


def test_good_ssh_port():
    text = MINIMAL.replace("ip: 127.0.1.1}", "ip: 127.0.1.1, ssh_port: 2222}")
    assert parse(text).node("a").port == 2222
    text = MINIMAL.replace("ip: 127.0.1.1}", "ip: 127.0.1.1, port: 65535}")
    assert parse(text).node("a").port == 65535


ERRORS = [
    (MINIMAL.replace("ip: 127.0.1.2", "user: x"), "c.yaml: workers[1].ip: missing"),
    (MINIMAL.replace("name: b, ", ""), "c.yaml: workers[1].name: missing"),
    ("workers: []\n", "c.yaml: master: missing"),
    ("master: 3\n", "c.yaml: master: expected dict, got 3"),
    ("master: {name: m, ip: 127.0.1.1}\nworkers: {a: 1}\n",
     "c.yaml: workers: expected list, got {'a': 1}"),
    ("master: {name: m, local: true}\nworkers: [3]\n", "c.yaml: workers[0]: expected a mapping"),
    ("master: {name: m, local: true, train: false}\n",
     "c.yaml: workers: no training nodes (add workers or set master.train: true)"),
    (MINIMAL + "bogus: 1\n",
     "c.yaml: bogus: unknown field (allowed: backend, cluster, master, sync, training, workers)"),
    (MINIMAL + "cluster: {name: x, colour: red}\n",
     "c.yaml: cluster.colour: unknown field (allowed: health_timeout, known_hosts, lost_after,"
     " master_port, name, port_policy, rdzv_backend)"),
    (MINIMAL.replace("name: a,", "name: a, colour: red,"),
     "c.yaml: workers[0].colour: unknown field (allowed: cpu_procs, env, gpu_model, gpus, host,"
     " identity_file, ip, local, name, port, project_path, python, rank, ssh_port, user)"),
    (MINIMAL.replace("name: b", "name: a"), "c.yaml: duplicate node name 'a' (a and a)"),
    (MINIMAL.replace("name: b", "name: m"), "c.yaml: duplicate node name 'm' (m and m)"),
    (MINIMAL.replace("name: b,", "name: b, rank: 1,"),
     "c.yaml: duplicate node rank 1 (a and b)"),
    (MINIMAL.replace("name: b,", "name: b, rank: 5,"),
     "c.yaml: workers: node ranks must be 0..2, got 0, 1, 5"),
    (MINIMAL.replace("local: true", "local: true, env: {1BAD: x}"),
     "c.yaml: master.env: not an environment variable name: '1BAD'"),
    (MINIMAL.replace("ip: 127.0.1.1", "ip: 127.0.1.1, env: {A-B: x}"),
     "c.yaml: workers[0].env: not an environment variable name: 'A-B'"),
    (MINIMAL.replace("ip: 127.0.1.1", "ip: 127.0.1.1, env: {A: [1]}"),
     "c.yaml: workers[0].env.A: expected a string"),
    (MINIMAL.replace("ip: 127.0.1.1", "ip: 127.0.1.1, python: {strategy: conda}"),
     "c.yaml: workers[0].python.strategy: must be one of pixi, venv, system"),
    (MINIMAL.replace("ip: 127.0.1.1", "ip: 127.0.1.1, python: {strategy: pixi, path: x}"),
     "c.yaml: workers[0].python.path: unknown field (allowed: command, env, strategy, venv)"),
    (MINIMAL.replace("ip: 127.0.1.1", "ip: '127.0.1.1;reboot'"),
     "c.yaml: workers[0].ip: not a host name or address: '127.0.1.1;reboot'"),
    (MINIMAL.replace("name: a", "name: 'a b'"),
     "c.yaml: workers[0].name: use letters, digits, '.', '_' or '-' (at most 64)"),
    (MINIMAL.replace("ip: 127.0.1.1", "ip: 127.0.1.1, gpus: -1"),
     "c.yaml: workers[0].gpus: must be >= 0"),
    (MINIMAL.replace("ip: 127.0.1.1", "ip: 127.0.1.1, gpus: true"),
     "c.yaml: workers[0].gpus: expected int, got True"),
    (MINIMAL.replace("ip: 127.0.1.1", "ip: 127.0.1.1, cpu_procs: 0"),
     "c.yaml: workers[0].cpu_procs: must be >= 1"),
    (MINIMAL.replace("local: true", "local: 'yes'"),
     "c.yaml: master.local: expected bool, got 'yes'"),
    (MINIMAL + "cluster: {rdzv_backend: etcd}\n",
     "c.yaml: cluster.rdzv_backend: must be c10d or static"),
    (MINIMAL + "cluster: {master_port: 70000}\n", "c.yaml: cluster.master_port: not a port"),
    (MINIMAL + "cluster: {health_timeout: 0}\n", "c.yaml: cluster.health_timeout: must be > 0"),
    (MINIMAL + "cluster: {port_policy: steal}\n",
     "c.yaml: cluster.port_policy: must be next-free or refuse"),
    (MINIMAL + "cluster: 3\n", "c.yaml: cluster: expected a mapping"),
    (MINIMAL + "sync: {paths: data}\n", "c.yaml: sync.paths: expected list, got 'data'"),
    ("", "c.yaml: empty file"),
    ("# nothing but a comment\n\n", "c.yaml: empty file"),
    ("master: [1\n",
     "c.yaml: line 2, column 1: invalid YAML (expected ',' or ']', but got '<stream end>')"),
    ("master:\n  name: m\n   local: true\n",
     "c.yaml: line 3, column 9: invalid YAML (mapping values are not allowed here)"),
    ("\tmaster: x\n",
     "c.yaml: line 1, column 1: invalid YAML (found character '\\t' that cannot start any token)"),
]


@pytest.mark.parametrize("text,message", ERRORS, ids=[m[8:48] for _, m in ERRORS])
def test_errors_are_one_line_naming_file_and_place(text, message):
    assert error(text) == message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level_is_an_error(text):
    assert error(text).endswith("expected a mapping")


def test_non_mapping_top_level_message_has_no_empty_field():
    assert ": :" not in error("- a\n- b\n")


def test_worker_train_false_is_not_silently_ignored():
    text = MINIMAL.replace("name: b,", "name: b, train: false,")
    try:
        c = parse(text)
    except ConfigError as exc:
        assert "workers[1].train" in str(exc)
    else:
        assert "b" not in [n.name for n in c.nodes]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_cluster("nope.yaml", tmp_path)
    assert str(exc.value) == f"{tmp_path / 'nope.yaml'}: cluster file not found"


def test_unreadable_path(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_cluster(tmp_path, ROOT)
    assert str(exc.value) == f"{tmp_path}: cannot read (Is a directory)"


def test_load_names_the_real_file_in_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL.replace("ip: 127.0.1.2", "user: x"))
    with pytest.raises(ConfigError) as exc:
        load_cluster(path)
    assert str(exc.value) == f"{path}: workers[1].ip: missing"
