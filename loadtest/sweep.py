"""`kvrec sweep`: every policy replayed against a live service, one after another, side by side.

For each policy: a fresh Redis namespace (a new key prefix; on the sweep's own private Redis also a
FLUSHALL), `kvrec serve` started as a subprocess with that policy, the replayed users' prefixes loaded
(warm-up, outside the timed run), Locust headless for the duration as a subprocess writing per-request
records, then `/metrics` and Redis `INFO memory` read and the server stopped. Every request is a
deterministic function of (dataset, options, seed), which is what makes `top10_overlap` against
`full` meaningful (see loadtest.report).

Everything is on loopback (the server binds 127.0.0.1; the private Redis listens on a unix socket
only) and bounded: users replayed, run time per policy, and a timeout on every wait.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvrec.loadtest import report
from kvrec.loadtest.options import ReplayOptions, to_flags
from kvrec.loadtest.records import read_records
from kvrec.loadtest.streams import ReplaySource, load_source
from kvrec.loadtest.warmup import warm_up
from kvrec.models.cli import UsageError

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")


class SweepError(RuntimeError):
    """A step of the sweep failed; the message says which and points at its log."""


@dataclass
class SweepConfig:
    """One sweep: what `kvrec sweep` parsed. `replay` is what every Locust run replays (the same
    options the Locust user takes, see loadtest.options); the rest is the sweep's own."""

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


def _slug(index: int, policy: str) -> str:
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", policy)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict:
    """The environment of the server and Locust subprocesses: this checkout importable without an
    install, and nothing from the caller's KVREC_* settings leaking into the measured server (the
    sweep passes every setting it means as a flag)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVREC_") and k != "REDIS_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# ----------------------------------------------------------------------------------------------- redis


class Redis:
    """The Redis the sweep measures against: a private redis-server (unix socket only, no persistence,
    removed afterwards), or the one at `url`, where the sweep only ever touches its own key prefixes."""

    def __init__(self, url: str | None, workdir: Path):
        from kvrec.server.embedded_redis import EmbeddedRedis, EmbeddedRedisError

        self.embedded: EmbeddedRedis | None = None
        if url is None:
            try:
                self.embedded = EmbeddedRedis(unix_socket=str(workdir / "redis.sock")).start()
            except EmbeddedRedisError as exc:
                raise SweepError(str(exc)) from exc
            url = self.embedded.url
        import redis

        self.url = url
        self.client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError as exc:
                if time.monotonic() > deadline:
                    self.close()
                    raise SweepError(f"Redis at {url} does not answer: {exc}") from exc
                time.sleep(0.05)

    @property
    def private(self) -> bool:
        return self.embedded is not None

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def version(self) -> str:
        return str(self.client.info("server").get("redis_version"))

    def clear(self, prefix: str) -> None:
        """Empty the namespace: FLUSHALL on the private Redis, else delete the prefix's keys."""
        if self.private:
            self.client.flushall()
            return
        batch = []
        for key in self.client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                self.client.unlink(*batch)
                batch = []
        if batch:
            self.client.unlink(*batch)

    def close(self) -> None:
        self.client.close()
        if self.embedded is not None:
            self.embedded.stop()


# ---------------------------------------------------------------------------------------------- server


class Server:
    """`kvrec serve` as a subprocess on a free loopback port, ready once `/readyz` answers 200."""

    def __init__(self, cfg: SweepConfig, policy: str, redis_url: str, prefix: str, log: Path):
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = log
        cmd = [sys.executable, "-m", "kvrec.cli", "serve", "--model", str(cfg.model), "--policy", policy,
               "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--redis-url", redis_url,
               "--workers", str(cfg.server_workers), "--key-prefix", prefix, "--log-level", "warning"]
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
        import httpx

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


def locust_command(cfg: SweepConfig, host: str, records: Path) -> list[str]:
    """The headless Locust run of one policy; warm-up is left to the sweep (--skip-warm-up)."""
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "-u", str(cfg.users), "-r", str(cfg.spawn_rate), "-t", f"{cfg.duration_s:g}s",
            "--stop-timeout", "5", "--host", host, "--exit-code-on-error", "0",
            *to_flags(cfg.replay), "--records", str(records), "--skip-warm-up", *cfg.extra_locust_args]


def run_locust(cfg: SweepConfig, host: str, records: Path, log: Path) -> None:
    cmd = locust_command(cfg, host, records)
    timeout = cfg.duration_s + 120  # startup (dataset load) and the stop timeout on top of the run
    with open(log, "w") as out:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise SweepError(f"Locust did not finish within {timeout:.0f} s; log: {log}") from exc
    if proc.returncode != 0:
        raise SweepError(f"Locust exited with code {proc.returncode}; its log ({log}) ends:\n{_tail(log)}")


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
    return (f"[{i}/{n}] {policy:<24} warm-up {warmup_s:5.1f}s | {f('rps', row['rps'])} req/s "
            f"p50 {f('p50_ms', row['p50_ms'])} ms p99 {f('p99_ms', row['p99_ms'])} ms | "
            f"ndcg@10 {f('ndcg@10', row['ndcg@10'])} | "
            f"{f('bytes_per_user_mean', row['bytes_per_user_mean'])}/user")


def check_inputs(cfg: SweepConfig, source: ReplaySource | None = None) -> ReplaySource:
    """Everything the user can get wrong, checked before anything starts (no Redis, no server, no
    output folder): the checkpoint loads, every policy spec parses for its model, the dataset loads and
    shares items with the model. Raises the user-error types kvrec.cli prints as one line."""
    from kvrec.compression.cli import check_policies
    from kvrec.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(cfg.model)
    check_policies(cfg.policies, checkpoint)
    source = source or load_source(cfg.replay.dataset, prefix_fraction=cfg.replay.prefix_fraction,
                                   max_users=cfg.replay.replay_users)
    if set(source.catalogue).isdisjoint(checkpoint.item_ids):
        raise UsageError(f"none of the items of {source.name} is in the catalogue of {cfg.model}; replay the "
                         "dataset the model was trained on")
    return source


def run_sweep(cfg: SweepConfig, source: ReplaySource | None = None, echo=print) -> list[dict]:
    """Check the inputs, run every policy and write the report into cfg.out; returns the summary rows.

    A policy whose server or load test fails is reported and skipped; the sweep goes on and raises
    SweepError at the end, after writing what it has.
    """
    source = check_inputs(cfg, source)
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    echo(f"sweep: {len(cfg.policies)} policies x {cfg.duration_s:g} s, {cfg.users} Locust users, "
         f"{len(source.streams)} users of {source.name} replayed -> {cfg.out}")
    run_id = time.strftime("%Y%m%d%H%M%S")
    rows, records, failures, per_policy, metrics_by_policy = [], {}, [], [], {}
    with tempfile.TemporaryDirectory(prefix="kvrec-sweep-") as tmp:
        redis = Redis(cfg.redis_url, Path(tmp))
        try:
            for i, policy in enumerate(cfg.policies, start=1):
                pdir = cfg.out / "policies" / _slug(i, policy)
                pdir.mkdir(parents=True, exist_ok=True)
                prefix = f"sweep-{run_id}-{i}"
                try:
                    info = _run_policy(cfg, policy, source, redis, prefix, pdir)
                except (SweepError, OSError) as exc:
                    failures.append(policy)
                    echo(f"[{i}/{len(cfg.policies)}] {policy}: FAILED: {exc}")
                    per_policy.append({"policy": policy, "error": str(exc), "dir": str(pdir)})
                    continue
                records[policy] = read_records(pdir / "records.jsonl")
                metrics_by_policy[policy] = info.pop("metrics")
                row = report.summary_row(policy, records[policy], metrics_by_policy[policy],
                                         info["redis_used_memory"], reference=None)
                rows.append(row)
                per_policy.append({"policy": policy, "dir": str(pdir), **info})
                echo(progress_line(i, len(cfg.policies), policy, row, info["warm_up_s"]))
            redis_version = redis.version()
        finally:
            redis.close()
    # accuracy on the requests every policy answered, overlap against full's answers: both need all runs
    common = set.intersection(*map(report.scored_keys, records.values())) if records else set()
    redis_used = {row["policy"]: row["redis_used_memory"] for row in rows}
    rows = [report.summary_row(p, records[p], metrics_by_policy[p], redis_used[p],
                               records.get(report.REFERENCE_POLICY), common or None) for p in records]
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
           "seconds": round(time.time() - started, 1), "config": {**asdict(cfg), "model": str(cfg.model),
                                                                    "out": str(cfg.out)},
           "dataset": {"name": source.name, "users_replayed": len(source.streams),
                       "catalogue": len(source.catalogue)},
           "model": _model_info(cfg.model),
           "redis": {"private": cfg.redis_url is None, "version": redis_version},
           "versions": package_versions(), "machine": describe_machine(), "git_commit": _git_commit(),
           "policies": per_policy}
    (cfg.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    details = [f"Dataset `{source.name}` ({len(source.streams)} users replayed), model `{cfg.model.name}`, "
               f"{cfg.users} Locust users for {cfg.duration_s:g} s per policy, "
               f"{cfg.replay.events_per_request} event(s) per request, {cfg.replay.candidates} ranking; "
               f"machine: {run['machine'].get('cpu')} x {os.cpu_count()}.",
               "Configuration, versions and per-policy logs: `run.json`, `policies/`."]
    report.write_report(cfg.out, rows, records, "kvrec policy sweep", details)
    echo("")
    echo(report.markdown_table(rows, report.pareto_front(rows)))
    if failures:
        raise SweepError(f"{len(failures)} of {len(cfg.policies)} policies failed: {', '.join(failures)}; "
                         f"see {cfg.out / 'run.json'}")
    return rows


def _run_policy(cfg: SweepConfig, policy: str, source: ReplaySource, redis: Redis, prefix: str,
                pdir: Path) -> dict:
    redis.clear(prefix)
    (pdir / "records.jsonl").unlink(missing_ok=True)  # records are appended: start this run's afresh
    baseline = redis.used_memory()
    server = Server(cfg, policy, redis.url, prefix, pdir / "server.log")
    try:
        warm = warm_up(server.url, source.streams, concurrency=cfg.replay.warm_up_concurrency)
        run_locust(cfg, server.url, pdir / "records.jsonl", pdir / "locust.log")
        metrics = server.metrics()
        used = redis.used_memory() - baseline
    finally:
        server.stop()
    redis.clear(prefix)
    (pdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return {"metrics": metrics, "redis_used_memory": used, "warm_up_s": round(warm.seconds, 2),
            "warm_up_events": warm.events}


def _model_info(path: Path) -> dict:
    """The checkpoint's config and fingerprint, from its safetensors metadata (no weights loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {"path": str(path), "fingerprint": meta.get("fingerprint"),
            "config": json.loads(meta.get("config", "{}")),
            "dataset_fingerprint": meta.get("dataset_fingerprint")}
