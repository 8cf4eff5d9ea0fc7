"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The file must parse, its services must reference each other and their volumes consistently, the
Redis eviction setting must never reach event logs, and every command a container runs must be a real
`kvrec` or `locust` invocation: each one is parsed here by the real argument parser (`kvrec`'s from
`kvrec.cli.build_parser`, Locust's with the replay's options registered, in a subprocess because
importing Locust monkey-patches the interpreter). The same commands run for real outside Docker in
tests/test_loadtest_locustfile.py (master and workers) and tests/test_loadtest_sweep.py (serve).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {"redis", "train", "api", "locust-master", "locust-worker"}
NODES = {f"redis-node-{i}" for i in range(1, 7)}
CLUSTER = NODES | {"redis-cluster-init", "api-cluster"}  # the `cluster` profile


def interpolate(value):
    """Compose's `${VAR:-default}` with the environment empty: the defaults the stack starts with."""
    if isinstance(value, str):
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "${" not in str(interpolate(doc)), "a variable without a default would start empty"
    return interpolate(doc)


def commands(compose: dict, program: str) -> dict[str, list[str]]:
    return {name: svc["command"] for name, svc in compose["services"].items()
            if isinstance(svc.get("command"), list) and svc["command"][0] == program}


def test_services_reference_each_other_and_declared_volumes(compose):
    services = compose["services"]
    assert set(services) == SERVICES | CLUSTER
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
            # a default service never waits for one that only the cluster profile starts
            assert name in CLUSTER or dep not in CLUSTER, f"{name} depends on the cluster's {dep}"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert source.startswith((".", "/")) or source in compose["volumes"], f"{name}: volume {source}"
        if name not in {"redis", "redis-cluster-init"} | NODES:
            assert svc["build"] == "." and (ROOT / "Dockerfile").is_file()
        assert svc.get("profiles") == (["cluster"] if name in CLUSTER else None), name
    assert services["api"]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    assert services["locust-master"]["depends_on"]["api"]["condition"] == "service_healthy"
    # the model the trainer writes is the one the api reads, through one volume
    train_out = services["train"]["command"][services["train"]["command"].index("--out") + 1]
    api_model = services["api"]["command"][services["api"]["command"].index("--model") + 1]
    assert train_out == api_model and "models:/models:ro" in services["api"]["volumes"]


def test_api_is_scalable_and_checked_on_readyz(compose):
    api = compose["services"]["api"]
    assert "container_name" not in api and "ports" not in api  # fixed names or host ports stop --scale
    test = api["healthcheck"]["test"]
    assert "/readyz" in test[-1]
    compile(test[-1], "healthcheck", "exec")  # the python -c program is valid Python
    host = compose["services"]["locust-master"]["command"]
    assert host[host.index("--host") + 1] == "http://api:8000"


def test_redis_can_evict_states_but_never_event_logs(compose):
    for name in ("redis", *sorted(NODES)):
        cmd = compose["services"][name]["command"]
        assert cmd[cmd.index("--maxmemory-policy") + 1].startswith("volatile-")  # only keys with a TTL
        assert "--maxmemory" in cmd and cmd[cmd.index("--appendonly") + 1] == "yes"
    for name in ("api", "api-cluster"):
        env = compose["services"][name]["environment"]
        assert int(env["KVREC_STATE_TTL_S"]) > 0 and "KVREC_EVENTS_TTL_S" not in env


def test_cluster_profile_forms_three_masters_with_a_replica_each(compose, tmp_path):
    """Each node its own volume and cluster mode; the one-shot init, run here by a real shell with
    stand-ins for `getent` and `redis-cli` that log their arguments, resolves the six nodes and creates
    the cluster once (a second `up` finds it formed and leaves it)."""
    services = compose["services"]
    for name in NODES:
        cmd = services[name]["command"]
        assert cmd[cmd.index("--cluster-enabled") + 1] == "yes" and services[name]["volumes"] == [f"{name}:/data"]
    init = services["redis-cluster-init"]
    assert set(init["depends_on"]) == NODES and init["restart"] == "no" and init["entrypoint"] == ["sh", "-c"]
    script = init["command"][0].replace("$$", "$")  # compose's escape of a literal $
    log = tmp_path / "calls"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "getent").write_text('#!/bin/sh\necho "10.0.0.${2#redis-node-}   $2"\n')
    (fake / "redis-cli").write_text(f'#!/bin/sh\necho "$*" >> {log}\n'
                                    '[ "$3" = cluster ] && echo "${CLUSTER_STATE:-cluster_state:fail}"\nexit 0\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin"}
    subprocess.run(["sh", "-c", script], env=env, check=True, timeout=30)
    first = log.read_text().splitlines()
    assert first[0] == "-h redis-node-1 cluster info"
    assert first[1] == ("--cluster create " + " ".join(f"10.0.0.{i}:6379" for i in range(1, 7))
                        + " --cluster-replicas 1 --cluster-yes")
    log.unlink()
    subprocess.run(["sh", "-c", script], env={**env, "CLUSTER_STATE": "cluster_state:ok"}, check=True, timeout=30)
    assert log.read_text().splitlines() == ["-h redis-node-1 cluster info"]  # formed already: left alone


def test_api_cluster_serves_from_a_cluster_node_and_locust_can_target_it(compose):
    from kvrec.cli import build_parser

    api = compose["services"]["api-cluster"]
    serve = build_parser().parse_args(api["command"][1:])
    assert serve.redis_url.startswith("redis+cluster://redis-node-")
    assert serve.redis_url.split("//")[1].split(":")[0] in NODES
    assert api["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
    assert api["healthcheck"] == compose["services"]["api"]["healthcheck"] and "ports" not in api
    master = (ROOT / "docker-compose.yml").read_text()
    assert '"--host", "${KVREC_API_URL:-http://api:8000}"' in master  # KVREC_API_URL=http://api-cluster:8000


def test_kvrec_commands_parse_with_the_real_cli(compose):
    from kvrec.cli import build_parser

    found = commands(compose, "kvrec")
    assert set(found) == {"train", "api", "api-cluster"}
    for name, cmd in found.items():
        args = build_parser().parse_args(cmd[1:])
        assert callable(args.func), name
    serve = build_parser().parse_args(found["api"][1:])
    assert (serve.host, serve.port, serve.redis_url) == ("0.0.0.0", 8000, "redis://redis:6379/0")


def test_locust_commands_parse_with_locusts_parser_and_the_replay_options(compose):
    found = commands(compose, "locust")
    assert set(found) == {"locust-master", "locust-worker"}
    program = ("import sys, loadtest.locustfile\n"
               "from locust.argument_parser import get_parser\n"
               "for line in sys.stdin.read().split('\\n'):\n"
               "    opts = get_parser().parse_args(line.split('\\x1f'))\n"
               "    print(opts.locustfile, opts.master, opts.worker, getattr(opts, 'dataset', None))\n")
    lines = "\n".join("\x1f".join(cmd[1:]) for cmd in found.values())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", program], input=lines, capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    master, worker = proc.stdout.splitlines()
    assert master == "loadtest/locustfile.py True False synth-long"
    assert worker.startswith("loadtest/locustfile.py False True")
    for cmd in found.values():
        assert (ROOT / cmd[cmd.index("-f") + 1]).is_file()


def test_dockerfile_installs_every_package_the_project_declares():
    dockerfile = (ROOT / "Dockerfile").read_text()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setuptools["package-dir"]
    folders = {dirs.get(pkg, pkg.replace(".", "/")).split("/")[0] for pkg in setuptools["packages"]}
    assert folders == {"kvrec", "models", "compression", "server", "loadtest"}
    for folder in folders:
        assert f"COPY {folder} ./{folder}" in dockerfile
    assert "pip install ." in dockerfile and "EXPOSE 8000 8089" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
