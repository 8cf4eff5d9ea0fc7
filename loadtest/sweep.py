"""`kvrec sweep`: every policy replayed against a live service, one after another, side by side.

For each policy: a fresh Redis namespace (a new key prefix; on the sweep's own private Redis also a
FLUSHALL), `kvrec serve` started as a subprocess with that policy, the replayed users' prefixes loaded
(warm-up, outside the timed run), Locust headless for the duration as a subprocess writing per-request
records, then `/metrics` and Redis `INFO memory` read and the server stopped. Every request is a
deterministic function of (dataset, options, seed), which is what makes `top10_overlap` against
`full` meaningful (see loadtest.report).

Load is a closed loop of `--users` virtual users (loadtest/locustfile.py), or with `--rate` an open loop
at that many requests per second (loadtest/openloop.py); `--find-capacity` runs open-loop steps at
rates chosen by loadtest.capacity, each after a fresh warm-up, and reports the highest rate with p99
under `--p99-ms`. `--locust-workers N` runs Locust as a master and N worker processes (each a core)
for rates one Locust process cannot send on time. `--redis-cluster N` measures against a private
N-master Redis Cluster instead of a single private Redis.

Everything is on loopback (the server binds 127.0.0.1; the private Redis listens on a unix socket
only) and bounded: users replayed, run time per policy, and a timeout on every wait.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kvrec.loadtest import report
from kvrec.loadtest.capacity import Capacity, find_capacity, judge
from kvrec.loadtest.options import ReplayOptions, to_flags
from kvrec.loadtest.records import read_records, record_files
from kvrec.loadtest.streams import ReplaySource, load_source
from kvrec.loadtest.warmup import API_TOKEN_VARIABLE, METRICS_SETTLE_S, warm_up
from kvrec.models.cli import UsageError

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
OPEN_LOOP_LOCUSTFILE = Path(__file__).resolve().with_name("openloop.py")
CPU_WARNING = "CPU usage above"  # what Locust logs when a process of it saturates its core


class SweepError(RuntimeError):
    """A step of the sweep failed; the message says which and points at its log."""


@dataclass
class CapacitySearch:
    """`--find-capacity`: the latency target and the bounds of the search (loadtest.capacity)."""

    p99_ms: float = 50.0
    min_rate: float = 1.0
    max_rate: float = 1000.0
    max_steps: int = 10
    step_s: float = 10.0
    tolerance: float = 0.1  # stop bisecting when the bracket is narrower than 10%


@dataclass
class SweepConfig:
    """One sweep: what `kvrec sweep` parsed. `replay` is what every Locust run replays (the same
    options the Locust user takes, see loadtest.options; `replay.rate > 0` is an open loop); the rest
    is the sweep's own."""

    model: Path
    policies: list[str]
    out: Path
    replay: ReplayOptions = field(default_factory=ReplayOptions)
    users: int = 4  # concurrent Locust users
    spawn_rate: float = 4.0
    duration_s: float = 60.0
    redis_url: str | None = None  # None: a private redis-server for the sweep
    server_workers: int = 1
    ready_timeout_s: float = 120.0
    extra_locust_args: list[str] = field(default_factory=list)
    capacity: CapacitySearch | None = None  # search each policy's capacity instead of one run
    locust_workers: int = 0  # 0: one Locust process; N: a master and N worker processes
    drain_s: float = 5.0  # open loop: how long requests in flight at the end may take (--stop-timeout)
    redis_cluster: int = 0  # N > 0: a private Redis Cluster of N masters (with redis_url None)
    hot_tier_bytes: int | None = None  # `kvrec serve --hot-tier-bytes` (None: the service's default)
    hot_writeback_events: int | None = None  # `kvrec serve --hot-writeback-events` (None: its default)

    @property
    def open_loop(self) -> bool:
        return self.replay.rate > 0 or self.capacity is not None


def _slug(index: int, policy: str) -> str:
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", policy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict:
    """The environment of the server and Locust subprocesses: this checkout importable without an
    install, and nothing from the caller's KVREC_* settings leaking into the measured server (the
    sweep passes every setting it means as a flag) but KVREC_API_TOKEN, which the server then asks of
    every write and the warm-up and Locust send (it is never a flag: it would show in the process list)."""
    env = {k: v for k, v in os.environ.items()
           if (not k.startswith("KVREC_") or k == API_TOKEN_VARIABLE) and k != "REDIS_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# ----------------------------------------------------------------------------------------------- redis


class Redis:
    """The Redis the sweep measures against: a private redis-server (unix socket only, no persistence,
    removed afterwards), a private Redis Cluster of `cluster_masters` masters on loopback ports, or the
    one at `url` (`redis+cluster://` for a cluster), where the sweep only ever touches its own key
    prefixes. Memory and clearing go to every master of a cluster."""

    def __init__(self, url: str | None, workdir: Path, cluster_masters: int = 0):
        from kvrec.server.embedded_redis import EmbeddedRedis, EmbeddedRedisCluster, EmbeddedRedisError

        self.embedded: EmbeddedRedis | EmbeddedRedisCluster | None = None
        if url is None:
            try:
                self.embedded = (EmbeddedRedisCluster(masters=cluster_masters, workdir=workdir / "cluster")
                                 if cluster_masters else EmbeddedRedis(unix_socket=str(workdir / "redis.sock"))).start()
            except EmbeddedRedisError as exc:
                raise SweepError(str(exc)) from exc
            url = self.embedded.url
        import redis

        self.url = url
        self.client = cluster_client(url) if url.startswith(CLUSTER_SCHEME) else redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    self.close()
                    raise SweepError(f"Redis at {url} does not answer: {exc}") from exc
                time.sleep(0.05)

    @property
    def private(self) -> bool:
        return self.embedded is not None

    @property
    def masters(self) -> int:
        """Masters serving the data: 1 for a single Redis."""
        return len(self._nodes())

    def _nodes(self) -> list:
        """Where each command goes: every master of a cluster, or the one Redis (None)."""
        return self.client.get_primaries() if hasattr(self.client, "get_primaries") else [None]

    def _on(self, node, *args):
        return self.client.execute_command(*args) if node is None else \
            self.client.execute_command(*args, target_nodes=node)

    def used_memory(self) -> int:
        """INFO memory used_memory, summed over the masters (replicas hold copies, not more data)."""
        return sum(int(self._info(node, "memory")["used_memory"]) for node in self._nodes())

    def _info(self, node, section: str) -> dict:
        return self.client.info(section) if node is None else self.client.info(section, target_nodes=node)

    def version(self) -> str:
        return str(self._info(self._nodes()[0], "server").get("redis_version"))

    def clear(self, prefix: str) -> None:
        """Empty the namespace: FLUSHALL on the private Redis (every master), else delete the prefix's keys."""
        if self.private:
            for node in self._nodes():
                self._on(node, "FLUSHALL")
            return
        batch = []
        for key in self.client.scan_iter(match=f"{prefix}:*", count=1000):  # a cluster client scans every master
            batch.append(key)
            if len(batch) >= 1000:
                self.client.unlink(*batch)  # and splits a multi-key command by slot
                batch = []
        if batch:
            self.client.unlink(*batch)

    def close(self) -> None:
        self.client.close()
        if self.embedded is not None:
            self.embedded.stop()


CLUSTER_SCHEME = "redis+cluster://"


def cluster_client(url: str):
    """A synchronous Redis Cluster client for a `redis+cluster://host:port` URL (any one node; the client
    discovers the others)."""
    from redis.cluster import RedisCluster

    return RedisCluster.from_url("redis://" + url[len(CLUSTER_SCHEME):])


# ---------------------------------------------------------------------------------------------- server


class Server:
    """`kvrec serve` as a subprocess on a free loopback port, ready once `/readyz` answers 200."""

    def __init__(self, cfg: SweepConfig, policy: str, redis_url: str, prefix: str, log: Path):
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = log
        cmd = [sys.executable, "-m", "kvrec.cli", "serve", "--model", str(cfg.model), "--policy", policy,
               "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--redis-url", redis_url,
               "--workers", str(cfg.server_workers), "--key-prefix", prefix, "--log-level", "warning"]
        for flag, value in (("--hot-tier-bytes", cfg.hot_tier_bytes), ("--hot-writeback-events",
                                                                        cfg.hot_writeback_events)):
            if value is not None:
                cmd += [flag, str(value)]
        # with several workers, /metrics/reset and /metrics wait for the others' counts (metrics_flush_s)
        self.settle_s = METRICS_SETTLE_S if cfg.server_workers > 1 else 0.0
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(),
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(cfg.ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SweepError(f"the server exited with code {self.proc.returncode} before it was ready; "
                                 f"its log ({self.log}) ends:\n{_tail(self.log)}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SweepError(f"the server was not ready after {timeout_s:.0f} s; log: {self.log}")

    def metrics(self) -> dict:
        """/metrics after the run; with several workers once each has added its last counts (every
        metrics_flush_s), since only the answering one adds its own before it reads."""
        import httpx

        time.sleep(self.settle_s)
        resp = httpx.get(f"{self.url}/metrics", timeout=30)
        resp.raise_for_status()
        return resp.json()

    def stop(self) -> None:
        """SIGTERM to the server's process group (uvicorn workers included), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------- locust


def locust_command(cfg: SweepConfig, host: str, records: Path, replay: ReplayOptions | None = None,
                   duration_s: float | None = None, master_port: int | None = None) -> list[str]:
    """The headless Locust run of one policy (its master with `master_port`); warm-up is left to the
    sweep (--skip-warm-up). Closed loop: cfg.users virtual users. Open loop: one scheduling user per
    Locust process (see loadtest/openloop.py), and --stop-timeout as the drain."""
    replay = replay or cfg.replay
    processes = max(1, cfg.locust_workers)
    if replay.rate > 0:
        locustfile, users, spawn, stop = OPEN_LOOP_LOCUSTFILE, processes, processes, cfg.drain_s
    else:
        locustfile, users, spawn, stop = LOCUSTFILE, cfg.users, cfg.spawn_rate, 5
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--only-summary",
           "-u", str(users), "-r", str(spawn), "-t", f"{math.ceil(duration_s or cfg.duration_s)}s",  # whole seconds
           "--stop-timeout", f"{stop:g}", "--host", host, "--exit-code-on-error", "0",
           *to_flags(replay), "--records", str(records), "--skip-warm-up", *cfg.extra_locust_args]
    if master_port is not None:
        cmd += ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port),
                "--expect-workers", str(cfg.locust_workers), "--expect-workers-max-wait", "120"]
    return cmd


def worker_command(locustfile: Path, master_port: int) -> list[str]:
    """A Locust worker: it gets the options, the run and its share of the users from the master."""
    return [sys.executable, "-m", "locust", "-f", str(locustfile), "--worker", "--master-host", "127.0.0.1",
            "--master-port", str(master_port)]


def run_locust(cfg: SweepConfig, host: str, records: Path, log: Path, replay: ReplayOptions | None = None,
               duration_s: float | None = None) -> bool:
    """One Locust run (a master and cfg.locust_workers workers when distributed), logs beside `log`.
    Returns whether a Locust process warned that its CPU was saturated (its requests then left late)."""
    distributed = cfg.locust_workers > 0
    port = _free_port() if distributed else None
    cmd = locust_command(cfg, host, records, replay, duration_s, port)
    timeout = (duration_s or cfg.duration_s) + cfg.drain_s + 120  # startup (dataset load) and the drain
    logs = [log] + [log.with_name(f"{log.stem}.worker{i}{log.suffix}") for i in range(cfg.locust_workers)]
    workers: list[subprocess.Popen] = []
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            for wlog in logs[1:]:
                with open(wlog, "w") as wout:
                    workers.append(subprocess.Popen(worker_command(Path(cmd[4]), port), cwd=ROOT, env=_child_env(),
                                                    stdout=wout, stderr=subprocess.STDOUT))
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise SweepError(f"Locust did not finish within {timeout:.0f} s; log: {log}") from exc
        finally:
            for p in (proc, *workers):  # workers leave when their master quits; a straggler is stopped
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    if proc.returncode != 0:
        raise SweepError(f"Locust exited with code {proc.returncode}; its log ({log}) ends:\n{_tail(log)}")
    return any(CPU_WARNING in f.read_text(errors="replace") for f in logs if f.exists())


# ----------------------------------------------------------------------------------------------- sweep


def describe_machine() -> dict:
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "hostname": socket.gethostname()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                            if ln.startswith("model name")), None)
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
        info["memory_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, TypeError):
        pass
    return info


def package_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("kvrec", "torch", "numpy", "fastapi", "uvicorn", "redis", "hiredis", "locust", "safetensors",
                 "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def progress_line(i: int, n: int, policy: str, row: dict, warmup_s: float) -> str:
    f = report.format_value
    capacity = next((k for k in row if k.startswith(report.CAPACITY_PREFIX)), None)
    head = offered = ""
    if capacity:
        head = f"capacity {f(capacity, row[capacity])} req/s at p99 <= {capacity[len(report.CAPACITY_PREFIX):]} | "
    if "offered_rps" in row:
        offered = f" (offered {f('offered_rps', row['offered_rps'])}, {row['unsent']} unsent)"
    return (f"[{i}/{n}] {policy:<24} warm-up {warmup_s:5.1f}s | {head}{f('rps', row['rps'])} req/s{offered} "
            f"p50 {f('p50_ms', row['p50_ms'])} ms p99 {f('p99_ms', row['p99_ms'])} ms | "
            f"ndcg@10 {f('ndcg@10', row['ndcg@10'])} (own requests; the table: common ones) | "
            f"{f('bytes_per_user_mean', row['bytes_per_user_mean'])}/user")


def check_inputs(cfg: SweepConfig, source: ReplaySource | None = None) -> ReplaySource:
    """Everything the user can get wrong, checked before anything starts (no Redis, no server, no
    output folder): the checkpoint loads, every policy spec parses for its model, the dataset loads and
    shares items with the model. Raises the user-error types kvrec.cli prints as one line."""
    from kvrec.compression.cli import check_policies
    from kvrec.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(cfg.model)
    check_policies(cfg.policies, checkpoint)
    if not cfg.replay.holdout:  # the model's held-out users, whom Locust then replays too (to_flags)
        cfg.replay = replace(cfg.replay, holdout=checkpoint.holdout)
    source = source or load_source(cfg.replay.dataset, prefix_fraction=cfg.replay.prefix_fraction,
                                   max_users=cfg.replay.replay_users, holdout=cfg.replay.holdout)
    if set(source.catalogue).isdisjoint(checkpoint.item_ids):
        raise UsageError(f"none of the items of {source.name} is in the catalogue of {cfg.model}; replay the "
                         "dataset the model was trained on")
    if cfg.open_loop:
        seconds = cfg.capacity.step_s if cfg.capacity else cfg.duration_s
        lowest = cfg.capacity.min_rate if cfg.capacity else cfg.replay.rate
        if lowest * seconds > available_requests(cfg, source):
            raise UsageError(f"{lowest:g} requests/s for {seconds:g} s needs {lowest * seconds:.0f} requests, "
                             f"but the {len(source.streams)} replayed users have only "
                             f"{available_requests(cfg, source)}: raise --replay-users or shorten the run")
    return source


def available_requests(cfg: SweepConfig, source: ReplaySource) -> int:
    """How many requests the replayed users' streams hold: an open loop cannot send more in one run."""
    per = cfg.replay.events_per_request
    return sum(-(-len(s.future) // per) for s in source.streams)


def run_sweep(cfg: SweepConfig, source: ReplaySource | None = None, echo=print) -> list[dict]:
    """Check the inputs, run every policy and write the report into cfg.out; returns the summary rows.

    A policy whose server or load test fails is reported and skipped; the sweep goes on and raises
    SweepError at the end, after writing what it has.
    """
    source = check_inputs(cfg, source)
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    echo(f"sweep: {len(cfg.policies)} policies, {describe_load(cfg)}, "
         f"{len(source.streams)} users of {source.name} replayed -> {cfg.out}")
    if cfg.capacity and available_requests(cfg, source) / cfg.capacity.step_s < cfg.capacity.max_rate:
        echo(f"note: rates capped at {available_requests(cfg, source) / cfg.capacity.step_s:.1f} req/s: the "
             f"replayed users hold {available_requests(cfg, source)} requests for steps of "
             f"{cfg.capacity.step_s:g} s (raise --replay-users for more)")
    run_id = time.strftime("%Y%m%d%H%M%S")
    rows, records, failures, per_policy, metrics_by_policy, extras = [], {}, [], [], {}, {}
    with tempfile.TemporaryDirectory(prefix="kvrec-sweep-") as tmp:
        redis = Redis(cfg.redis_url, Path(tmp), cluster_masters=cfg.redis_cluster)
        try:
            for i, policy in enumerate(cfg.policies, start=1):
                pdir = cfg.out / "policies" / _slug(i, policy)
                pdir.mkdir(parents=True, exist_ok=True)
                prefix = f"sweep-{run_id}-{i}"
                try:
                    info = _run_policy(cfg, policy, source, redis, prefix, pdir, echo)
                except (SweepError, OSError) as exc:
                    failures.append(policy)
                    echo(f"[{i}/{len(cfg.policies)}] {policy}: FAILED: {exc}")
                    per_policy.append({"policy": policy, "error": str(exc), "dir": str(pdir)})
                    continue
                records[policy] = read_records(pdir / "records.jsonl")
                metrics_by_policy[policy] = info.pop("metrics")
                extras[policy] = info.pop("columns")
                row = report.summary_row(policy, records[policy], metrics_by_policy[policy],
                                         info["redis_used_memory"], reference=None, **extras[policy])
                rows.append(row)
                per_policy.append({"policy": policy, "dir": str(pdir), **info})
                echo(progress_line(i, len(cfg.policies), policy, row, info["warm_up_s"]))
                if info.get("load_generator_saturated"):
                    echo(f"  note: a Locust process saturated its CPU core, so some requests left late and "
                         f"their lag counts as latency; see {pdir}/locust*.log and add --locust-workers")
            redis_info = {"private": cfg.redis_url is None, "version": redis.version(),
                          "cluster_masters": redis.masters}
        finally:
            redis.close()
    # accuracy on the requests every policy answered, overlap against full's answers: both need all runs
    common = set.intersection(*map(report.scored_keys, records.values())) if records else set()
    redis_used = {row["policy"]: row["redis_used_memory"] for row in rows}
    rows = [report.summary_row(p, records[p], metrics_by_policy[p], redis_used[p],
                               records.get(report.REFERENCE_POLICY), common or None, **extras[p]) for p in records]
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
           "seconds": round(time.time() - started, 1), "config": {**asdict(cfg), "model": str(cfg.model),
                                                                    "out": str(cfg.out)},
           "dataset": {"name": source.name, "users_replayed": len(source.streams),
                       "catalogue": len(source.catalogue)},
           "model": _model_info(cfg.model),
           "redis": redis_info,
           "versions": package_versions(), "machine": describe_machine(), "git_commit": _git_commit(),
           "policies": per_policy}
    (cfg.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    store = (f"a {cfg.redis_cluster}-master Redis Cluster" if cfg.redis_cluster
             else "a private Redis" if cfg.redis_url is None else "Redis at --redis-url")
    details = [f"Dataset `{source.name}` ({len(source.streams)} users replayed, "
               f"{'held out of training' if cfg.replay.holdout else 'users the model trained on'}), "
               f"model `{cfg.model.name}`, "
               f"{describe_load(cfg)} per policy, {cfg.replay.events_per_request} event(s) per request, "
               f"{cfg.replay.candidates} ranking, {store}; "
               f"machine: {run['machine'].get('cpu')} x {os.cpu_count()}.",
               "Configuration, versions and per-policy logs: `run.json`, `policies/`."]
    report.write_report(cfg.out, rows, records, "kvrec policy sweep", details)
    echo("")
    echo(report.markdown_table(rows, report.pareto_front(rows)))
    if failures:
        raise SweepError(f"{len(failures)} of {len(cfg.policies)} policies failed: {', '.join(failures)}; "
                         f"see {cfg.out / 'run.json'}")
    return rows


def describe_load(cfg: SweepConfig) -> str:
    """The load of each policy's run, in words, for the progress lines and the report."""
    procs = f", Locust on {cfg.locust_workers} worker processes" if cfg.locust_workers else ""
    if cfg.capacity:
        c = cfg.capacity
        return (f"capacity search at p99 <= {c.p99_ms:g} ms ({cfg.replay.arrivals} open-loop arrivals, "
                f"{c.min_rate:g}-{c.max_rate:g} req/s, at most {c.max_steps} steps of {c.step_s:g} s{procs})")
    if cfg.replay.rate > 0:
        return (f"open loop at {cfg.replay.rate:g} req/s ({cfg.replay.arrivals} arrivals) for "
                f"{cfg.duration_s:g} s{procs}")
    return f"closed loop of {cfg.users} Locust users for {cfg.duration_s:g} s{procs}"


def _clear_records(path: Path) -> None:
    """Records are appended: a run starts its files afresh (its workers' included)."""
    for f in record_files(path):
        f.unlink()


def _run_policy(cfg: SweepConfig, policy: str, source: ReplaySource, redis: Redis, prefix: str,
                pdir: Path, echo=print) -> dict:
    redis.clear(prefix)
    _clear_records(pdir / "records.jsonl")
    baseline = redis.used_memory()
    server = Server(cfg, policy, redis.url, prefix, pdir / "server.log")
    capacity: Capacity | None = None
    try:
        if cfg.capacity is None:
            warm = warm_up(server.url, source.streams, concurrency=cfg.replay.warm_up_concurrency,
                           settle_s=server.settle_s)
            saturated = run_locust(cfg, server.url, pdir / "records.jsonl", pdir / "locust.log")
            offered = cfg.replay.rate if cfg.open_loop else None
        else:
            capacity, warm, saturated = _search_capacity(cfg, policy, server, source, pdir, echo)
            offered = next(s.rate for s in capacity.steps if s.rate == capacity.rate)
        metrics = server.metrics()
        used = redis.used_memory() - baseline
    finally:
        server.stop()
    redis.clear(prefix)
    (pdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    columns: dict = {}
    if offered is not None:
        columns["offered_rps"] = offered
    if capacity is not None:
        value = report.CapacityBound(capacity.rate, capacity.bound) if capacity.bound else capacity.rate
        columns["capacity"] = (report.capacity_key(cfg.capacity.p99_ms), value)
    return {"metrics": metrics, "columns": columns, "redis_used_memory": used, "warm_up_s": round(warm.seconds, 2),
            "warm_up_events": warm.events, "load_generator_saturated": saturated,
            "capacity": capacity.as_dict() if capacity else None}


def _search_capacity(cfg: SweepConfig, policy: str, server: Server, source: ReplaySource, pdir: Path,
                     echo) -> tuple[Capacity, object, bool]:
    """Probe open-loop rates for this policy's server (loadtest.capacity); each step starts from the
    warmed-up prefixes again, so every step replays the same requests and only the rate differs. The
    chosen step's records become the policy's records.jsonl. -> (capacity, first warm-up, saturated)."""
    c = cfg.capacity
    max_rate = min(c.max_rate, available_requests(cfg, source) / c.step_s)
    start = min(max(cfg.replay.rate or c.min_rate, c.min_rate), max_rate)
    warm_first, saturated, step_dirs = None, False, {}

    def probe(rate: float):
        nonlocal warm_first, saturated
        sdir = pdir / "steps" / f"{len(step_dirs) + 1:02d}-{rate:.1f}rps"
        sdir.mkdir(parents=True, exist_ok=True)
        _clear_records(sdir / "records.jsonl")
        warm = warm_up(server.url, source.streams, concurrency=cfg.replay.warm_up_concurrency,
                       settle_s=server.settle_s)
        warm_first = warm_first or warm
        replay = replace(cfg.replay, rate=rate)
        saturated |= run_locust(cfg, server.url, sdir / "records.jsonl", sdir / "locust.log", replay, c.step_s)
        step = judge(rate, report.client_stats(read_records(sdir / "records.jsonl")), c.p99_ms)
        step_dirs[rate] = sdir
        p99 = "-" if step.p99_ms is None else f"{step.p99_ms:.1f}"
        echo(f"  {policy}: {rate:7.1f} req/s -> p99 {p99} ms, {step.errors} errors, {step.late} late: "
             + ("sustained" if step.sustained else f"not sustained ({step.why})"))
        return step

    capacity = find_capacity(probe, start=start, min_rate=min(c.min_rate, max_rate), max_rate=max_rate,
                             max_steps=c.max_steps, tolerance=c.tolerance)
    for f in record_files(step_dirs[capacity.rate] / "records.jsonl"):
        shutil.copyfile(f, pdir / f.name)
    return capacity, warm_first, saturated


def _model_info(path: Path) -> dict:
    """The checkpoint's config and fingerprint, from its safetensors metadata (no weights loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {"path": str(path), "fingerprint": meta.get("fingerprint"),
            "config": json.loads(meta.get("config", "{}")),
            "dataset_fingerprint": meta.get("dataset_fingerprint")}
