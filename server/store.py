"""Where the service keeps its data: the store interfaces, and Redis behind them.

Two small interfaces, so that nothing outside this module sees Redis types, keys, scripts or packed events:

    StateStore   per user: an event log (the truth) and a state blob (a cache of "the first n events")
                 append(user, events, replace)  -> Appended     the log numbers the events
                 load(user, with_state, whole_log) -> Snapshot  the blob and the decoded events it lacks
                 store(user, epoch, seq, blob, answer) -> Stored     compare-and-set, only ever forward
                 delete(user) -> records removed;  ping();  close()
    MetricsSink  service-wide counters, latency samples and a census of stored states, shared by every
                 worker process: add, read, reset, forget_user

Every failure to reach the backend surfaces as `StoreUnavailable`, whatever the backend's own errors are.

The Redis implementation keeps three keys per user, all with the encoded user id inside one hash tag so
that they land on one Redis Cluster slot and a Lua script may touch them together:

    {prefix}:{<uid>}:events  list   packed events, oldest first, trimmed to the newest `max_log_events`
    {prefix}:{<uid>}:meta    hash   n (events ever appended), last_ts, epoch, topk (the last answer)
    {prefix}:{<uid>}:state   hash   seq (events folded in), epoch, blob (the encoded state)

An event's sequence number is its absolute position, `n - len(list) + index`, so trimming the list never
renumbers events. `epoch` is a random id given to a user's log when it is created: deleting or replacing
a user starts a new epoch, so a request still in flight for the old one can never write its state back.

Every write is one Lua script, so a request that is rejected (a timestamp earlier than the user's last
event) writes nothing, and two requests for one user can interleave freely: appends are atomic, and a
state is stored only if it has folded in more events than the one already there.
"""

from __future__ import annotations

import enum
import json
import struct
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote

import redis.asyncio as redis
from kvrec.server.settings import Settings
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

# ----------------------------------------------------------------------------- the interfaces


class LoggedEvent(NamedTuple):
    """One event of a user's log, as the API received it."""

    item_id: str
    ts: int
    action: int


class StateStatus(enum.Enum):
    """What `load` found where the user's state is kept."""

    FOUND = "found"  # a blob of this epoch whose events the log still holds
    MISSING = "missing"  # none stored (never, expired, or not asked for)
    UNUSABLE = "unusable"  # one of another epoch, or older than the oldest event the log still holds


class Stored(enum.Enum):
    """The outcome of `store`."""

    STORED = "stored"  # written (or, without a blob, the answer recorded)
    STALE = "stale"  # a state with as many events or more is already stored: nothing written
    GONE = "gone"  # the user was deleted or replaced since the load, or the log lacks `seq` events


class StoreUnavailable(Exception):
    """The backend could not be reached or refused the command; what was written is unknown."""


class TimestampError(ValueError):
    """New events start before the user's last stored event."""

    def __init__(self, first_ts: int, last_ts: int):
        super().__init__(f"events[0].ts={first_ts} is earlier than the user's last event (ts={last_ts}); "
                         "events must arrive in time order")


@dataclass(frozen=True)
class Appended:
    events_total: int  # events ever appended to the user's log (the next event's sequence number)
    epoch: str  # '' while the user has no log
    previous_answer: list[str] | None  # the user's last answer as given to `store`; None when none or no new events


@dataclass(frozen=True)
class Snapshot:
    """What one `load` saw of a user. Frozen: it is handed to a worker thread and read there."""

    epoch: str  # '' while the user has no log
    events_total: int  # events ever appended
    log_start: int  # sequence number of the oldest event the log still holds
    state: StateStatus
    blob: bytes  # the stored state when FOUND, else b''
    state_seq: int  # events the stored state has folded in when FOUND, else 0
    events_from: int  # sequence number of events[0]: the state's end, or log_start for the whole log
    events: tuple[LoggedEvent, ...]


class StateStore(ABC):
    """Per-user event logs and state blobs."""

    @abstractmethod
    async def append(self, user_id: str, events: Sequence[tuple[str, int, int]], replace: bool = False) -> Appended:
        """Append (item_id, ts, action) events in time order; with `replace`, the user's log, state and last
        answer are dropped first, in the same atomic step. Raises TimestampError, writing nothing, when the
        first event is older than the last stored one."""

    @abstractmethod
    async def load(self, user_id: str, with_state: bool, whole_log: bool) -> Snapshot:
        """The user's state blob (when `with_state`) and the logged events it has not folded in yet, or the
        whole log when `whole_log` or when there is no usable state."""

    @abstractmethod
    async def store(self, user_id: str, epoch: str, seq: int, blob: bytes | None,
                    answer: list[str] | None = None) -> Stored:
        """Compare-and-set: write `blob` (the state after `seq` events) only if no state of at least `seq`
        events of this epoch is stored, and record `answer` (item ids) as the user's last answer, which
        the next `append` hands back to grade it. `blob=None` records only the answer."""

    @abstractmethod
    async def delete(self, user_id: str) -> int:
        """Forget a user: log, state and last answer. -> records removed (0 for an unknown user)."""

    @abstractmethod
    async def ping(self) -> None:
        """Return when the backend answers; raise StoreUnavailable otherwise."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


@dataclass(frozen=True)
class Census:
    """One user's stored state, as the metrics count it."""

    bytes: int
    tokens: int
    events: int


@dataclass(frozen=True)
class MetricsData:
    """Everything `MetricsSink.read` returns."""

    since: float | None  # unix time of the first request counted since the last reset
    counters: dict[str, int]
    samples: list[list[float]]  # newest first: each a row of latencies as given to `add`
    per_second: dict[int, int]  # unix second -> requests counted in it
    census: dict[str, Census]  # user id -> their stored state
    memory_bytes: int  # memory the backend uses
    keys: int  # records the backend holds, of every user and of the metrics


class MetricsSink(ABC):
    """Service-wide metrics, shared by every worker process."""

    @abstractmethod
    async def add(self, at: float, counts: Mapping[str, int], sample: Sequence[float] | None = None,
                  census: tuple[str, Census] | None = None) -> None:
        """Add `counts` to the counters, count one request in the second of `at` (unix time), keep `sample`
        among the newest, and record a user's census, in one round trip."""

    @abstractmethod
    async def read(self, drop_seconds_before: float) -> MetricsData:
        """Everything recorded; per-second counts older than `drop_seconds_before` are dropped for good."""

    @abstractmethod
    async def reset(self) -> None:
        """Forget counters, samples and per-second counts (a new measurement phase); keep the census,
        which describes what the store holds rather than a phase."""

    @abstractmethod
    async def forget_user(self, user_id: str) -> None:
        """Drop a deleted user from the census."""


# ----------------------------------------------------------------------------- Redis

EVENT = struct.Struct("<qH")  # ts, action; followed by the item id as UTF-8


def _pack_event(item_id: str, ts: int, action: int) -> bytes:
    return EVENT.pack(ts, action) + item_id.encode()


def _unpack_event(entry: bytes) -> LoggedEvent:
    ts, action = EVENT.unpack_from(entry)
    return LoggedEvent(entry[EVENT.size:].decode(), ts, action)


def user_tag(user_id: str) -> str:
    """The user id as key material: percent-encoded, so it holds no `{`, `}` or `:` and no two ids meet."""
    return quote(user_id, safe="")


def connect_redis(settings: Settings) -> redis.Redis:
    """One pool per process. Retries are few and short: during an outage a request should fail fast
    with a 503, not hang; the pool reconnects by itself once Redis is back."""
    return redis.Redis.from_url(
        settings.redis_url, max_connections=settings.redis_max_connections,
        socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=2), health_check_interval=30)


@contextmanager
def _unavailable() -> Iterator[None]:
    """Redis errors leave this module as StoreUnavailable, which callers can handle without Redis."""
    try:
        yield
    except redis.RedisError as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc


# KEYS: events, meta, state. ARGV: cap, events_ttl (0: none), new epoch, first ts, last ts, replace, entries...
_APPEND = """
local events, meta, state = KEYS[1], KEYS[2], KEYS[3]
local cap, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local nnew = #ARGV - 6
if ARGV[6] == '1' then redis.call('DEL', events, meta, state) end
local info = redis.call('HMGET', meta, 'n', 'epoch', 'last_ts')
if nnew == 0 then
  return {tonumber(info[1] or '0'), info[2] or '', ''}
end
if info[3] and tonumber(ARGV[4]) < tonumber(info[3]) then
  return {-1, info[3], ''}
end
local topk = redis.call('HGET', meta, 'topk') or ''
for i = 7, #ARGV, 1000 do
  redis.call('RPUSH', events, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if redis.call('LLEN', events) > cap then redis.call('LTRIM', events, -cap, -1) end
local n = redis.call('HINCRBY', meta, 'n', nnew)
redis.call('HSETNX', meta, 'epoch', ARGV[3])
redis.call('HSET', meta, 'last_ts', ARGV[5])
if ttl > 0 then
  redis.call('EXPIRE', events, ttl)
  redis.call('EXPIRE', meta, ttl)
end
return {n, redis.call('HGET', meta, 'epoch'), topk}
"""

# KEYS: events, meta, state. ARGV: want_state, want_all.
# -> {n, epoch, seq (-1: no state, -2: unusable state), blob, position of the oldest kept event,
#     position of the first entry returned, entries}
_LOAD = """
local events, meta, state = KEYS[1], KEYS[2], KEYS[3]
local info = redis.call('HMGET', meta, 'n', 'epoch')
local n, epoch = tonumber(info[1] or '0'), info[2] or ''
local first = n - redis.call('LLEN', events)
local from, seq, blob = first, -1, ''
if ARGV[1] == '1' then
  local s = redis.call('HMGET', state, 'seq', 'epoch', 'blob')
  if s[1] then
    local sseq = tonumber(s[1])
    if s[2] == epoch and sseq >= first and sseq <= n then
      seq, blob = sseq, s[3]
      if ARGV[2] ~= '1' then from = sseq end
    else
      seq = -2
    end
  end
end
return {n, epoch, seq, blob, first, from, redis.call('LRANGE', events, from - first, -1)}
"""
_LOAD_STATUS = {-1: StateStatus.MISSING, -2: StateStatus.UNUSABLE}

# KEYS: state, meta. ARGV: seq, epoch, state_ttl (0: none), blob, topk ('' keeps it), write_state.
# -> 1 stored, 0 a state with as many events or more is already there, -1 the user was deleted or replaced.
_STORE = """
local state, meta = KEYS[1], KEYS[2]
local info = redis.call('HMGET', meta, 'n', 'epoch')
if not info[2] or info[2] ~= ARGV[2] then return -1 end
if ARGV[5] ~= '' then redis.call('HSET', meta, 'topk', ARGV[5]) end
if ARGV[6] ~= '1' then return 1 end
local seq = tonumber(ARGV[1])
if seq > tonumber(info[1]) then return -1 end
local cur = redis.call('HMGET', state, 'seq', 'epoch')
if cur[1] and cur[2] == ARGV[2] and tonumber(cur[1]) >= seq then return 0 end
redis.call('HSET', state, 'seq', ARGV[1], 'epoch', ARGV[2], 'blob', ARGV[4])
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', state, ARGV[3]) else redis.call('PERSIST', state) end
return 1
"""
_STORE_STATUS = {1: Stored.STORED, 0: Stored.STALE, -1: Stored.GONE}


class RedisStore(StateStore):
    """The StateStore in one Redis database, behind a key prefix."""

    def __init__(self, client: redis.Redis, prefix: str, max_log_events: int,
                 state_ttl_s: int | None, events_ttl_s: int | None):
        self.redis = client
        self.prefix = prefix
        self.max_log_events = max_log_events
        self.state_ttl_s = state_ttl_s or 0
        self.events_ttl_s = events_ttl_s or 0
        self._append = client.register_script(_APPEND)
        self._load = client.register_script(_LOAD)
        self._store = client.register_script(_STORE)

    @classmethod
    def connect(cls, settings: Settings) -> RedisStore:
        """A store on its own connection pool to `settings.redis_url` (connecting lazily, on first use)."""
        return cls(connect_redis(settings), settings.key_prefix, settings.max_log_events, settings.state_ttl_s,
                   settings.events_ttl_s)

    def metrics_sink(self, max_samples: int) -> RedisMetricsSink:
        """The metrics of this store's prefix, on the same connection pool."""
        return RedisMetricsSink(self.redis, self.prefix, max_samples)

    def keys(self, user_id: str) -> tuple[str, str, str]:
        """-> (events, meta, state) keys of one user."""
        base = f"{self.prefix}:{{{user_tag(user_id)}}}"
        return f"{base}:events", f"{base}:meta", f"{base}:state"

    async def append(self, user_id: str, events: Sequence[tuple[str, int, int]], replace: bool = False) -> Appended:
        first_ts, last_ts = (events[0][1], events[-1][1]) if events else (0, 0)
        with _unavailable():
            n, epoch, answer = await self._append(
                keys=self.keys(user_id),
                args=[self.max_log_events, self.events_ttl_s, uuid.uuid4().hex, first_ts, last_ts, int(replace),
                      *(_pack_event(*e) for e in events)])
        if n == -1:
            raise TimestampError(first_ts, int(epoch))  # the script answers the last ts in place of the epoch
        return Appended(int(n), _text(epoch), json.loads(answer) if answer else None)

    async def load(self, user_id: str, with_state: bool, whole_log: bool) -> Snapshot:
        with _unavailable():
            n, epoch, seq, blob, start, first, entries = await self._load(
                keys=self.keys(user_id), args=[int(with_state), int(whole_log)])
        status = _LOAD_STATUS.get(seq, StateStatus.FOUND)
        found = status is StateStatus.FOUND
        return Snapshot(epoch=_text(epoch), events_total=int(n), log_start=int(start), state=status,
                        blob=blob if found else b"", state_seq=int(seq) if found else 0, events_from=int(first),
                        events=tuple(_unpack_event(e) for e in entries))

    async def store(self, user_id: str, epoch: str, seq: int, blob: bytes | None,
                    answer: list[str] | None = None) -> Stored:
        _, meta, state = self.keys(user_id)
        with _unavailable():
            reply = await self._store(
                keys=[state, meta],
                args=[seq, epoch, self.state_ttl_s, blob or b"", "" if answer is None else json.dumps(answer),
                      int(blob is not None)])
        return _STORE_STATUS[reply]

    async def delete(self, user_id: str) -> int:
        with _unavailable():
            return int(await self.redis.delete(*self.keys(user_id)))

    async def ping(self) -> None:
        with _unavailable():
            await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()




class RedisMetricsSink(MetricsSink):
    """Metrics in four keys beside the users' (a reset clears the first three):

        {prefix}:metrics:counters   hash  name -> count, and `since`
        {prefix}:metrics:latency    list  "unix_ts v1 v2 ..." per sample, newest first, trimmed to `max_samples`
        {prefix}:metrics:seconds    hash  unix second -> requests
        {prefix}:metrics:users      hash  user id -> "bytes tokens events" of their stored state
    """

    def __init__(self, client: redis.Redis, prefix: str, max_samples: int):
        self.redis = client
        self.max_samples = max_samples
        base = f"{prefix}:metrics"
        self.counters, self.latency = f"{base}:counters", f"{base}:latency"
        self.seconds, self.users = f"{base}:seconds", f"{base}:users"

    async def add(self, at: float, counts: Mapping[str, int], sample: Sequence[float] | None = None,
                  census: tuple[str, Census] | None = None) -> None:
        pipe = self.redis.pipeline(transaction=False)
        if sample is not None:
            pipe.lpush(self.latency, f"{at:.3f} " + " ".join(f"{v:.4f}" for v in sample))
            pipe.ltrim(self.latency, 0, self.max_samples - 1)
        if census is not None:
            user_id, c = census
            pipe.hset(self.users, user_id, f"{c.bytes} {c.tokens} {c.events}")
        for name, value in counts.items():
            pipe.hincrby(self.counters, name, value)
        pipe.hsetnx(self.counters, "since", f"{at:.3f}")
        pipe.hincrby(self.seconds, str(int(at)), 1)
        with _unavailable():
            await pipe.execute()

    async def read(self, drop_seconds_before: float) -> MetricsData:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.counters)
        pipe.lrange(self.latency, 0, -1)
        pipe.hgetall(self.seconds)
        pipe.hgetall(self.users)
        pipe.info("memory")
        pipe.dbsize()
        with _unavailable():
            counters, samples, seconds, users, memory, keys = await pipe.execute()
            per_second = {int(s): int(n) for s, n in seconds.items()}
            stale = [s for s in per_second if s < drop_seconds_before]
            if stale:
                await self.redis.hdel(self.seconds, *stale)
        since = counters.pop(b"since", None)
        return MetricsData(
            since=float(since) if since is not None else None,
            counters={_text(k): int(v) for k, v in counters.items()},
            samples=[[float(x) for x in s.split()[1:]] for s in samples],
            per_second={s: n for s, n in per_second.items() if s >= drop_seconds_before},
            census={_text(u): Census(*(int(x) for x in v.split())) for u, v in users.items()},
            memory_bytes=int(memory["used_memory"]), keys=int(keys))

    async def reset(self) -> None:
        with _unavailable():
            await self.redis.delete(self.counters, self.latency, self.seconds)

    async def forget_user(self, user_id: str) -> None:
        with _unavailable():
            await self.redis.hdel(self.users, user_id)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
