"""Where the service keeps its data: the store interfaces, and Redis behind them.

Two small interfaces, so that nothing outside this module sees Redis types, keys, scripts or packed events:

    StateStore   per user: an event log (the truth) and a state blob (a cache of "the first n events")
                 append(user, events, replace, request_id) -> Appended   applied at most once per request id
                 load(user, with_state, whole_log, held) -> Snapshot  the blob (unless the caller's `held`
                                                              copy is current) and the events it lacks
                 store(user, epoch, seq, blob, answer, last_event) -> Stored   compare-and-set, only forward
                 delete(user) -> records removed;  ping();  info() -> BackendInfo;  close()
    MetricsSink  service-wide counters, latency samples and a census of stored states, shared by every
                 worker process: add, read, reset, forget_user

Every failure to reach the backend surfaces as `StoreUnavailable`, whatever the backend's own errors are,
and says what the failed call may have written (`Written`). Damaged stored data never becomes an error
the caller cannot act on: a damaged state is an unusable cache (rebuilt, then overwritten), an
unreadable log entry is decoded as an unknown item, and a log whose keys are of the wrong type raises
`DamagedLog`, naming the damage; replacing or deleting the user repairs it.

The Redis implementation keeps five keys per user, all with the encoded user id inside one hash tag so
that they land on one Redis Cluster slot and a Lua script may touch them together:

    {prefix}:{<uid>}:events    list  packed events, oldest first, trimmed to the newest `max_log_events`
    {prefix}:{<uid>}:meta      hash  n (events ever appended), last_ts, epoch, topk (the last answer)
    {prefix}:{<uid>}:state     hash  seq (events folded in), epoch, blob (the encoded state)
    {prefix}:{<uid>}:requests  zset  ids of the requests that wrote, scored by time; the newest kept
    {prefix}:{<uid>}:digests   hash  request id -> digest of what that request wrote

An event's sequence number is its absolute position, `n - len(list) + index`, so trimming the list never
renumbers events. `epoch` is a random id given to a user's log when it is created: deleting or replacing
a user starts a new epoch, so a request still in flight for the old one can never write its state back.

Every write is one Lua script, so a request that is rejected (a timestamp earlier than the user's last
event) writes nothing, and two requests for one user can interleave freely: appends are atomic, and a
state is stored only if it has folded in more events than the one already there. The append records its
request id in the same script and does nothing for an id it has seen: redis-py retrying a script after a
timeout, a client retrying after a 503, or a duplicate delivery all append once. Each script's first
write is one that Redis refuses when it is out of memory (`maxmemory`), so an out-of-memory script
writes nothing at all; replacing a history writes the new log under a scratch key before it deletes the
old one, for the same reason.
"""

from __future__ import annotations

import enum
import json
import struct
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio as redis
import xxhash
from kvrec.server.settings import Settings
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import MovedError

# ----------------------------------------------------------------------------- the interfaces


class LoggedEvent(NamedTuple):
    """One event of a user's log, as the API received it."""

    item_id: str
    ts: int
    action: int


class StateStatus(enum.Enum):
    """What `load` found where the user's state is kept."""

    FOUND = "found"  # a blob of this epoch whose events the log still holds
    HELD = "held"  # the caller's copy (`held`) is current: no older than the stored state, and its events
    #                are still the log's; the blob was not sent
    MISSING = "missing"  # none stored (never, expired, or not asked for)
    UNUSABLE = "unusable"  # another epoch's, older than the oldest logged event, or a damaged record


class Stored(enum.Enum):
    """The outcome of `store`."""

    STORED = "stored"  # written (or, without a blob, the answer recorded)
    STALE = "stale"  # a state with as many events or more is already stored: nothing written
    GONE = "gone"  # the user was deleted or replaced since the load, or the log lacks `seq` events


class Written(enum.Enum):
    """What a call that failed may have written: what a 503 tells the client."""

    NOTHING = "nothing"  # nothing: a read, or a write the backend refused before it began (out of memory)
    UNKNOWN = "unknown"  # sent and not answered: it may have been applied (a retry with its id applies it once)
    EVENTS = "events"  # the request's events were appended; what failed came after


class StoreUnavailable(Exception):
    """The backend could not be reached or refused the command; `written` says what that left behind."""

    def __init__(self, message: str, written: Written = Written.UNKNOWN, out_of_memory: bool = False):
        super().__init__(message)
        self.written = written
        self.out_of_memory = out_of_memory


class TimestampError(ValueError):
    """New events start before the user's last stored event."""

    def __init__(self, first_ts: int, last_ts: int):
        super().__init__(f"events[0].ts={first_ts} is earlier than the user's last event (ts={last_ts}); "
                         "events must arrive in time order")


class IdempotencyConflict(ValueError):
    """A request id that an earlier request with other events (or another operation) already used."""

    def __init__(self, request_id: str):
        super().__init__(f"Idempotency-Key {request_id!r} was already used by a request with other events; "
                         "use a new key for a new request")


class DamagedLog(Exception):
    """The user's log is stored in a form the service cannot read (a key of the wrong type, a count that
    is not a number): it is not guessed at. Replacing or deleting the user repairs it."""

    def __init__(self, user_id: str, damage: str):
        super().__init__(f"the stored log of user {user_id!r} is damaged: {damage}")
        self.user_id = user_id
        self.damage = damage


@dataclass(frozen=True)
class Appended:
    events_total: int  # events ever appended to the user's log (the next event's sequence number)
    epoch: str  # '' while the user has no log
    previous_answer: list[str] | None  # the user's last answer as given to `store`; None when none or no new events
    replayed: bool = False  # the request id was seen before: nothing was appended this time


class Held(NamedTuple):
    """A state that the caller keeps itself (the hot tier's copy), as `load` checks it: the epoch it
    belongs to, the events it has folded in, and the last of those (None when it folded none), by which a
    log that was rolled back (a failover that lost appends, then new ones) is told from the one it saw."""

    epoch: str
    seq: int
    last: LoggedEvent | None


@dataclass(frozen=True)
class Snapshot:
    """What one `load` saw of a user. Frozen: it is handed to a worker thread and read there."""

    epoch: str  # '' while the user has no log
    events_total: int  # events ever appended
    log_start: int  # sequence number of the oldest event the log still holds
    state: StateStatus
    blob: bytes  # the stored state when FOUND, else b''
    state_seq: int  # events the stored (FOUND) or held (HELD) state has folded in, else 0
    events_from: int  # sequence number of events[0]: the state's end, or log_start for the whole log
    events: tuple[LoggedEvent, ...]
    unreadable_events: int = 0  # log entries that did not decode, given as unknown items at their place
    stored_seq: int | None = None  # events the stored state of this epoch has folded in, sent or not; None: none
    state_last: LoggedEvent | None = None  # the last event the FOUND or HELD state folded in (None: none, or trimmed)


@dataclass(frozen=True)
class BackendInfo:
    """What the backend says about itself (summed over a cluster's primaries)."""

    used_memory: int
    maxmemory: int  # 0: no limit
    keys: int  # records held, of every user and of the metrics
    run_ids: dict[str, str]  # node -> its run id, which changes when it restarts (a cluster: each primary)
    persistent: bool | None  # it keeps data over a restart (AOF or RDB snapshots); None: cannot tell

    @property
    def run_id(self) -> str:
        return ",".join(self.run_ids[node] for node in sorted(self.run_ids))


class StateStore(ABC):
    """Per-user event logs and state blobs."""

    @abstractmethod
    async def append(self, user_id: str, events: Sequence[tuple[str, int, int]], replace: bool = False,
                     request_id: str | None = None) -> Appended:
        """Append (item_id, ts, action) events in time order; with `replace`, the user's log, state and last
        answer are dropped first, in the same atomic step. Applied at most once per `request_id` (a fresh
        one when None): a second call with the same id and the same events and `replace` appends nothing
        and answers `replayed`; with others it raises IdempotencyConflict. Raises TimestampError, writing
        nothing, when the first event is older than the last stored one; DamagedLog when the log cannot
        be read."""

    @abstractmethod
    async def load(self, user_id: str, with_state: bool, whole_log: bool, held: Held | None = None) -> Snapshot:
        """The user's state blob (when `with_state`) and the logged events it has not folded in yet, or the
        whole log when `whole_log` or when there is no usable state. With `held`, the caller's own copy
        of the state, checked in the same read: when it is of the log's epoch, no older than the stored
        state, and the log still holds its last event and every one after it, the state is HELD and
        the blob is not sent (the events after the held copy are). Raises DamagedLog."""

    @abstractmethod
    async def store(self, user_id: str, epoch: str, seq: int, blob: bytes | None,
                    answer: list[str] | None = None, replace_equal: bool = False,
                    last_event: LoggedEvent | None = None) -> Stored:
        """Compare-and-set: write `blob` (the state after `seq` events) only if no state of at least `seq`
        events of this epoch is stored (of more than `seq` with `replace_equal`, which a rebuild uses to
        overwrite a damaged state of as many events), and record `answer` (item ids) as the user's last
        answer, which the next `append` hands back to grade it. `blob=None` records only the answer.
        With `last_event` (the state's last folded event), a log whose event `seq - 1` is another one
        (rolled back, then appended again) refuses the blob as GONE."""

    @abstractmethod
    async def delete(self, user_id: str) -> int:
        """Forget a user: log, state, last answer and request ids. -> records removed (0 for an unknown user)."""

    @abstractmethod
    async def ping(self) -> None:
        """Return when the backend answers; raise StoreUnavailable otherwise."""

    @abstractmethod
    async def info(self) -> BackendInfo:
        """Memory, records, identity and persistence of the backend."""

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
class WorkerGauge:
    """One worker's hot tier as it reported it last (a gauge, not a count: each report replaces the last)."""

    at: float  # unix time of the report
    bytes: int
    entries: int
    max_bytes: int


@dataclass
class MetricsBatch:
    """What one worker counted since its last flush to the sink."""

    counters: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[float, list[float]]] = field(default_factory=list)  # (unix time, figures), oldest first
    seconds: dict[int, int] = field(default_factory=dict)  # unix second -> requests
    census: dict[str, Census] = field(default_factory=dict)  # user id -> their stored state, the latest
    since: float | None = None  # unix time of the first request counted
    workers: dict[str, WorkerGauge] = field(default_factory=dict)  # worker id -> its hot tier now

    def __bool__(self) -> bool:
        return bool(self.counters or self.samples or self.seconds or self.census or self.workers)

    def merge_newer(self, newer: MetricsBatch, max_samples: int, max_users: int) -> MetricsBatch:
        """This batch (which could not be written) followed by `newer`, within the same bounds."""
        counters = dict(self.counters)
        for name, value in newer.counters.items():
            counters[name] = counters.get(name, 0) + value
        seconds = dict(self.seconds)
        for second, value in newer.seconds.items():
            seconds[second] = seconds.get(second, 0) + value
        census = dict(self.census)
        for user, c in newer.census.items():
            if user in census or len(census) < max_users:
                census[user] = c
        since = min((t for t in (self.since, newer.since) if t is not None), default=None)
        return MetricsBatch(counters, (self.samples + newer.samples)[-max_samples:], seconds, census, since,
                            {**self.workers, **newer.workers})


@dataclass(frozen=True)
class MetricsData:
    """Everything `MetricsSink.read` returns."""

    since: float | None  # unix time of the first request counted since the last reset
    counters: dict[str, int]
    samples: list[list[float]]  # newest first: each a row of latencies as given to `add`
    per_second: dict[int, int]  # unix second -> requests counted in it (the last `keep_seconds` only)
    census: dict[str, Census]  # user id -> their stored state
    workers: dict[str, WorkerGauge] = field(default_factory=dict)  # worker id -> its hot tier, last reported


class MetricsSink(ABC):
    """Service-wide metrics, shared by every worker process. Bounded: samples and the census are capped,
    per-second counts kept for a while, and every key expires when no worker writes for long."""

    @abstractmethod
    async def add(self, batch: MetricsBatch, now: float) -> None:
        """Add one worker's batch, in one round trip (atomic: all of it or, raising, none of it)."""

    @abstractmethod
    async def read(self) -> MetricsData:
        """Everything recorded."""

    @abstractmethod
    async def reset(self) -> None:
        """Forget counters, samples and per-second counts (a new measurement phase); keep the census and
        the workers' gauges, which describe what is held rather than a phase."""

    @abstractmethod
    async def forget_user(self, user_id: str) -> None:
        """Drop a deleted user from the census."""


# ----------------------------------------------------------------------------- Redis

EVENT = struct.Struct("<qH")  # ts, action; followed by the item id as UTF-8
CLUSTER_SCHEME = "redis+cluster"


def _pack_event(item_id: str, ts: int, action: int) -> bytes:
    return EVENT.pack(ts, action) + item_id.encode()


def _packed(event: LoggedEvent | None) -> bytes:
    """An event as the log holds it, to compare with the log's entry; b'' (nothing to compare) for none,
    and for an entry that was unreadable in the log (decoded as the unknown item '', which no request
    can send), whose bytes are not known."""
    return _pack_event(*event) if event is not None and event.item_id else b""


def _unpack_events(entries: list[bytes]) -> tuple[tuple[LoggedEvent, ...], int]:
    """Logged entries -> events, and how many did not decode. An unreadable entry (damaged in Redis) keeps
    its place, so that positions stay absolute, as an unknown item ('') at the time of the one before."""
    events, unreadable, ts = [], 0, 0
    for entry in entries:
        try:
            ts, action = EVENT.unpack_from(entry)
            events.append(LoggedEvent(entry[EVENT.size:].decode(), ts, action))
        except (struct.error, UnicodeDecodeError):
            unreadable += 1
            events.append(LoggedEvent("", ts, 0))
    return tuple(events), unreadable


def _digest(events: Sequence[bytes], replace: bool) -> str:
    """What a request writes, in 16 hex digits: a retry must carry the same, a reused id does not."""
    h = xxhash.xxh3_64(b"replace" if replace else b"append")
    for entry in events:
        h.update(struct.pack("<I", len(entry)))
        h.update(entry)
    return h.hexdigest()


def user_tag(user_id: str) -> str:
    """The user id as key material: percent-encoded, so it holds no `{`, `}` or `:` and no two ids meet."""
    return quote(user_id, safe="")


def is_cluster(settings: Settings) -> bool:
    return settings.redis_cluster or urlsplit(settings.redis_url).scheme == CLUSTER_SCHEME


def connect_redis(settings: Settings) -> redis.Redis | RedisCluster:
    """One pool per process, failing fast: each call waits at most `redis_timeout_s` for its socket and is
    retried `redis_retries` times after a timeout or a dropped connection (every script is safe to run
    twice), so a stalled Redis costs a request a bounded time and a 503, not a hang. A Redis Cluster
    (`redis+cluster://host:port`, or `redis_cluster`) gets a cluster client that routes each user's
    scripts to the node of their hash slot."""
    options = dict(socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s,
                   retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=settings.redis_retries),
                   max_connections=settings.redis_max_connections)
    if is_cluster(settings):
        url = urlunsplit(urlsplit(settings.redis_url)._replace(scheme="redis"))
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(settings.redis_url, health_check_interval=30, **options)


@contextmanager
def _unavailable(written: Written) -> Iterator[None]:
    """Redis errors leave this module as StoreUnavailable, which callers can handle without Redis. A
    command refused for memory wrote nothing: each script's first write is one Redis refuses then."""
    try:
        yield
    except (redis.RedisError, OSError) as exc:
        # Redis 7.0 reports an OOM inside a script as a script error, later versions as an OOM error
        if isinstance(exc, redis.OutOfMemoryError) or "OOM command not allowed" in str(exc):
            raise StoreUnavailable(f"Redis is out of memory (maxmemory): {exc}", Written.NOTHING,
                                   out_of_memory=True) from exc
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}", written) from exc


# Lua helpers shared by the scripts. A key of the wrong type or a field that is not a number is damage
# (written by hand, by another program, or a bug), and is checked before anything reads it.
_PRELUDE = """
local function wrong_type(key, kind)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= kind then return t end
end
local function count(value)
  local x = tonumber(value)
  if x and x >= 0 and x == math.floor(x) then return x end
end
local function log_damage(events, meta)
  local t = wrong_type(events, 'list')
  if t then return 'its event log key holds a ' .. t .. ', not a list' end
  t = wrong_type(meta, 'hash')
  if t then return 'its log metadata key holds a ' .. t .. ', not a hash' end
  local n = redis.call('HGET', meta, 'n')
  if n and not count(n) then return 'its event count is ' .. string.format('%q', string.sub(n, 1, 40)) end
  if (count(n) or 0) < redis.call('LLEN', events) then return 'its log holds more events than its count' end
end
"""

# KEYS: events, meta, state, requests, digests, scratch.
# ARGV: cap, events_ttl (0: none), new epoch, first ts, last ts, replace, request id, digest, now (ms),
#       ids ttl, ids kept, entries...
# -> {n, epoch, previous answer, replayed} | {-1, last ts} | {-2} (id used by another request) | {-3, damage}
_APPEND = _PRELUDE + """
local events, meta, state, reqs, digests, scratch = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local cap, ttl, replace = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[6] == '1'
local id, digest = ARGV[7], ARGV[8]
local nnew = #ARGV - 11

local function remember()
  redis.call('ZADD', reqs, ARGV[9], id)
  redis.call('HSET', digests, id, digest)
  local over = redis.call('ZCARD', reqs) - tonumber(ARGV[11])
  if over > 0 then
    redis.call('HDEL', digests, unpack(redis.call('ZRANGE', reqs, 0, over - 1)))
    redis.call('ZREMRANGEBYRANK', reqs, 0, over - 1)
  end
  redis.call('EXPIRE', reqs, ARGV[10])
  redis.call('EXPIRE', digests, ARGV[10])
end

if nnew > 0 or replace then
  if wrong_type(reqs, 'zset') or wrong_type(digests, 'hash') then redis.call('DEL', reqs, digests) end
  local seen = redis.call('HGET', digests, id)
  if seen then
    if seen ~= digest then return {-2} end
    -- a replay still writes (it refreshes the ids' TTL), so that a WAIT after it also covers the append
    -- it replays, which may not have reached a replica when its first answer was lost
    redis.call('EXPIRE', reqs, ARGV[10])
    if wrong_type(meta, 'hash') then return {0, '', '', 1} end
    local info = redis.call('HMGET', meta, 'n', 'epoch')
    return {count(info[1]) or 0, info[2] or '', '', 1}
  end
end

if replace then
  if nnew > 0 then
    if redis.call('EXISTS', scratch) == 1 then redis.call('DEL', scratch) end
    for i = 12, #ARGV, 1000 do
      redis.call('RPUSH', scratch, unpack(ARGV, i, math.min(i + 999, #ARGV)))
    end
  end
  remember()
  redis.call('DEL', events, meta, state)
  if nnew == 0 then return {0, '', '', 0} end
  redis.call('RENAME', scratch, events)
  if nnew > cap then redis.call('LTRIM', events, -cap, -1) end
  redis.call('HSET', meta, 'n', nnew, 'epoch', ARGV[3], 'last_ts', ARGV[5])
else
  local damage = log_damage(events, meta)
  if damage then return {-3, damage} end
  local info = redis.call('HMGET', meta, 'n', 'epoch', 'last_ts')
  if nnew == 0 then return {count(info[1]) or 0, info[2] or '', '', 0} end
  local last = tonumber(info[3])
  if last and tonumber(ARGV[4]) < last then return {-1, info[3]} end
  remember()
  for i = 12, #ARGV, 1000 do
    redis.call('RPUSH', events, unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  if redis.call('LLEN', events) > cap then redis.call('LTRIM', events, -cap, -1) end
  redis.call('HINCRBY', meta, 'n', nnew)
  redis.call('HSETNX', meta, 'epoch', ARGV[3])
  redis.call('HSET', meta, 'last_ts', ARGV[5])
end
if ttl > 0 then
  redis.call('EXPIRE', events, ttl)
  redis.call('EXPIRE', meta, ttl)
end
local after = redis.call('HMGET', meta, 'n', 'epoch', 'topk')
return {tonumber(after[1]), after[2], replace and '' or (after[3] or ''), 0}
"""

# KEYS: events, meta, state. ARGV: want_state, want_all, held epoch, held seq (-1: none), held last event.
# -> {n, epoch, seq (-1: no state, -2: unusable state, -4: the held copy is current), blob, position of the
#     oldest kept event, position of the first entry returned, entries, stored seq (-1: none usable), the
#     last event the state (stored or held) folded in ('' when none or trimmed)} | {-3, damage}
# The blob is read only when it is sent: a held copy that is current costs this script a few small reads.
_LOAD = _PRELUDE + """
local events, meta, state = KEYS[1], KEYS[2], KEYS[3]
local damage = log_damage(events, meta)
if damage then return {-3, damage} end
local info = redis.call('HMGET', meta, 'n', 'epoch')
local n, epoch = count(info[1]) or 0, info[2] or ''
local first = n - redis.call('LLEN', events)
local function last_before(s)  -- the entry of event s - 1 when the log holds it, else ''
  if s > first and s <= n then return redis.call('LINDEX', events, s - 1 - first) end
  return ''
end
local from, seq, blob, stored, base = first, -1, '', -1, nil
if ARGV[1] == '1' then
  if wrong_type(state, 'hash') then
    seq = -2
  else
    local s = redis.call('HMGET', state, 'seq', 'epoch')
    local has_blob = redis.call('HEXISTS', state, 'blob') == 1
    if s[1] or s[2] or has_blob then
      local sseq = count(s[1])
      if sseq and has_blob and s[2] == epoch and sseq >= first and sseq <= n then
        seq, stored = sseq, sseq
      else
        seq = -2
      end
    end
  end
  local held = tonumber(ARGV[4])
  if held >= 0 and ARGV[3] == epoch and epoch ~= '' and held >= first and held <= n and held >= stored
      and (held == first or ARGV[5] == '' or last_before(held) == ARGV[5]) then
    seq, base = -4, held
  elseif seq >= 0 then
    blob, base = redis.call('HGET', state, 'blob'), seq
  end
  if base and ARGV[2] ~= '1' then from = base end
end
local last = base and last_before(base) or ''
return {n, epoch, seq, blob, first, from, redis.call('LRANGE', events, from - first, -1), stored, last}
"""
_LOAD_STATUS = {-1: StateStatus.MISSING, -2: StateStatus.UNUSABLE, -4: StateStatus.HELD}

# KEYS: state, meta, events. ARGV: seq, epoch, state_ttl (0: none), blob, topk ('' keeps it), write_state,
#       replace_equal, the state's last event ('': not checked).
# -> 1 stored, 0 a state with as many events or more is already there, -1 the user was deleted or replaced
#    (or the log no longer holds the events the state folded in).
_STORE = _PRELUDE + """
local state, meta, events = KEYS[1], KEYS[2], KEYS[3]
if wrong_type(meta, 'hash') then return -1 end
local info = redis.call('HMGET', meta, 'n', 'epoch')
local n = count(info[1])
if not n or not info[2] or info[2] ~= ARGV[2] then return -1 end
if ARGV[5] ~= '' then redis.call('HSET', meta, 'topk', ARGV[5]) end
if ARGV[6] ~= '1' then return 1 end
local seq = tonumber(ARGV[1])
if seq > n then return -1 end
if ARGV[8] ~= '' and not wrong_type(events, 'list') then
  local at = seq - 1 - (n - redis.call('LLEN', events))
  if at >= 0 and redis.call('LINDEX', events, at) ~= ARGV[8] then return -1 end
end
if wrong_type(state, 'hash') then
  redis.call('DEL', state)
else
  local cur = redis.call('HMGET', state, 'seq', 'epoch')
  local stored = count(cur[1])
  if stored and cur[2] == ARGV[2] and (stored > seq or (stored == seq and ARGV[7] ~= '1')) then return 0 end
end
redis.call('HSET', state, 'seq', ARGV[1], 'epoch', ARGV[2], 'blob', ARGV[4])
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', state, ARGV[3]) else redis.call('PERSIST', state) end
return 1
"""
_STORE_STATUS = {1: Stored.STORED, 0: Stored.STALE, -1: Stored.GONE}


class UserKeys(NamedTuple):
    events: str
    meta: str
    state: str
    requests: str
    digests: str
    scratch: str  # the new log of a history being replaced, for the length of one script


class RedisStore(StateStore):
    """The StateStore in one Redis database (or a Redis Cluster), behind a key prefix."""

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str, max_log_events: int,
                 state_ttl_s: int | None, events_ttl_s: int | None, idempotency_ttl_s: int = 3600,
                 idempotency_keys_per_user: int = 64, wait_replicas: int = 0, wait_timeout_ms: int = 100):
        self.redis = client
        self.prefix = prefix
        self.max_log_events = max_log_events
        self.state_ttl_s = state_ttl_s or 0
        self.events_ttl_s = events_ttl_s or 0
        self.idempotency_ttl_s = idempotency_ttl_s
        self.idempotency_keys_per_user = idempotency_keys_per_user
        self.wait_replicas = wait_replicas  # > 0: an append is acknowledged once that many replicas have it
        self.wait_timeout_ms = wait_timeout_ms
        self._append = client.register_script(_APPEND)
        self._load = client.register_script(_LOAD)
        self._store = client.register_script(_STORE)

    @classmethod
    def connect(cls, settings: Settings) -> RedisStore:
        """A store on its own connection pool to `settings.redis_url` (connecting lazily, on first use); a
        Redis Cluster when the URL is `redis+cluster://host:port` or `settings.redis_cluster` is set."""
        return cls(connect_redis(settings), settings.key_prefix, settings.max_log_events, settings.state_ttl_s,
                   settings.events_ttl_s, settings.idempotency_ttl_s, settings.idempotency_keys_per_user,
                   settings.redis_wait_replicas, settings.redis_wait_timeout_ms)

    @property
    def is_cluster(self) -> bool:
        return isinstance(self.redis, RedisCluster)

    def metrics_sink(self, settings: Settings) -> RedisMetricsSink:
        """The metrics of this store's prefix, on the same connection pool."""
        return RedisMetricsSink(self.redis, self.prefix, settings.metrics_samples, settings.metrics_census_users,
                                settings.metrics_ttl_s, keep_seconds=10 * settings.metrics_window_s)

    def keys(self, user_id: str) -> UserKeys:
        """Every key of one user, all in one hash slot."""
        base = f"{self.prefix}:{{{user_tag(user_id)}}}"
        return UserKeys(*(f"{base}:{name}" for name in UserKeys._fields))

    async def append(self, user_id: str, events: Sequence[tuple[str, int, int]], replace: bool = False,
                     request_id: str | None = None) -> Appended:
        first_ts, last_ts = (events[0][1], events[-1][1]) if events else (0, 0)
        packed = [_pack_event(*e) for e in events]
        request_id = request_id or uuid.uuid4().hex
        keys = self.keys(user_id)
        args = [self.max_log_events, self.events_ttl_s, uuid.uuid4().hex, first_ts, last_ts, int(replace),
                request_id, _digest(packed, replace), int(time.time() * 1000), self.idempotency_ttl_s,
                self.idempotency_keys_per_user, *packed]
        with _unavailable(Written.UNKNOWN if events or replace else Written.NOTHING):
            if self.wait_replicas and (events or replace):
                reply = await self._append_and_wait(keys, args)
            else:
                reply = await self._append(keys=keys, args=args)
        code = reply[0]
        if code == -1:
            raise TimestampError(first_ts, int(reply[1]))
        if code == -2:
            raise IdempotencyConflict(request_id)
        if code == -3:
            raise DamagedLog(user_id, _text(reply[1]))
        n, epoch, answer, replayed = reply
        return Appended(int(n), _text(epoch), _answer(answer), bool(replayed))

    async def _append_and_wait(self, keys: UserKeys, args: list) -> list:
        """The append script, then `WAIT wait_replicas wait_timeout_ms` on the same connection (WAIT counts
        the replicas that have that connection's writes): one pipeline, on the node of the user's slot in
        a cluster. EVAL, not EVALSHA: a replica promoted a moment ago has no script cache. Fewer
        confirmations than asked is a StoreUnavailable saying the events were written (on the primary
        only, so a failover may still lose them); a retry with the same request id replays the append,
        which writes the ids' TTL, so that its own WAIT covers the append it replays.

        The pipeline is sent once (no redirection, no retry of a part of it): a WAIT retried alone on
        another connection would confirm nothing and count every replica. A slot that moved (MOVED) ran
        nothing, so the pair is sent again, once, to its new node."""
        reply, confirmed = await self._eval_and_wait(keys, args)
        if isinstance(reply, MovedError):
            await self.redis.nodes_manager.move_slot(reply)
            reply, confirmed = await self._eval_and_wait(keys, args)
        if isinstance(reply, Exception):
            raise reply
        if reply[0] < 0:  # refused (timestamp, id, damage): nothing was written, nothing to wait for
            return reply
        if isinstance(confirmed, Exception) or confirmed < self.wait_replicas:
            raise StoreUnavailable(
                f"the append reached {confirmed if isinstance(confirmed, int) else 'no'} of the "
                f"{self.wait_replicas} replica(s) asked for within {self.wait_timeout_ms} ms "
                "(redis_wait_replicas)", Written.EVENTS)
        return reply

    async def _eval_and_wait(self, keys: UserKeys, args: list) -> tuple:
        """(the append's reply, the replicas WAIT counted), each an exception when it failed."""
        if self.is_cluster:
            await self.redis.initialize()  # the slot table, on the first call
            node = self.redis.get_node_from_key(keys.events)
            pipe = self.redis.pipeline()
            pipe.execute_command("EVAL", _APPEND, len(keys), *keys, *args, target_nodes=node)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms, target_nodes=node)
            return tuple(await pipe.execute(raise_on_error=False, allow_redirections=False))
        pipe = self.redis.pipeline(transaction=False)
        pipe.eval(_APPEND, len(keys), *keys, *args)
        pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        return tuple(await pipe.execute(raise_on_error=False))

    async def load(self, user_id: str, with_state: bool, whole_log: bool, held: Held | None = None) -> Snapshot:
        held_args = ["", -1, b""] if held is None else [held.epoch, held.seq, _packed(held.last)]
        with _unavailable(Written.NOTHING):
            reply = await self._load(keys=self.keys(user_id)[:3], args=[int(with_state), int(whole_log), *held_args])
        if reply[0] == -3:
            raise DamagedLog(user_id, _text(reply[1]))
        n, epoch, seq, blob, start, first, entries, stored, last = reply
        status = _LOAD_STATUS.get(seq, StateStatus.FOUND)
        events, unreadable = _unpack_events(entries)
        base_seq = int(seq) if status is StateStatus.FOUND else held.seq if status is StateStatus.HELD else 0
        return Snapshot(epoch=_text(epoch), events_total=int(n), log_start=int(start), state=status,
                        blob=blob if status is StateStatus.FOUND else b"", state_seq=base_seq, events_from=int(first),
                        events=events, unreadable_events=unreadable, stored_seq=None if stored < 0 else int(stored),
                        state_last=_unpack_events([last])[0][0] if last else None)

    async def store(self, user_id: str, epoch: str, seq: int, blob: bytes | None,
                    answer: list[str] | None = None, replace_equal: bool = False,
                    last_event: LoggedEvent | None = None) -> Stored:
        keys = self.keys(user_id)
        with _unavailable(Written.UNKNOWN):
            reply = await self._store(
                keys=[keys.state, keys.meta, keys.events],
                args=[seq, epoch, self.state_ttl_s, blob or b"", "" if answer is None else json.dumps(answer),
                      int(blob is not None), int(replace_equal), _packed(last_event)])
        return _STORE_STATUS[reply]

    async def delete(self, user_id: str) -> int:
        with _unavailable(Written.UNKNOWN):
            return int(await self.redis.delete(*self.keys(user_id)))

    async def ping(self) -> None:
        with _unavailable(Written.NOTHING):
            await self.redis.ping()

    async def info(self) -> BackendInfo:
        with _unavailable(Written.NOTHING):
            if self.is_cluster:
                nodes = self.redis.get_primaries()
                names = [node.name for node in nodes]
                infos = [await self.redis.info(target_nodes=node) for node in nodes]
                saves = [await self._save_config(node) for node in nodes]
            else:
                names, infos, saves = ["redis"], [await self.redis.info()], [await self._save_config()]
        persistent = [bool(i.get("aof_enabled")) or s for i, s in zip(infos, saves)]
        return BackendInfo(
            used_memory=sum(int(i["used_memory"]) for i in infos),
            maxmemory=sum(int(i.get("maxmemory", 0)) for i in infos),
            keys=sum(int(v.get("keys", 0)) for i in infos for k, v in i.items() if k.startswith("db")),
            run_ids={name: str(i["run_id"]) for name, i in zip(names, infos)},
            persistent=None if None in persistent else all(persistent))

    async def _save_config(self, node=None) -> bool | None:
        """RDB snapshots configured; None where CONFIG is not allowed (many managed Redis services)."""
        try:
            config = await (self.redis.config_get("save", target_nodes=node) if node is not None
                            else self.redis.config_get("save"))
        except redis.ResponseError:
            return None
        return bool(_text(config.get("save") or config.get(b"save") or ""))

    async def close(self) -> None:
        await self.redis.aclose()


# KEYS: counters, latency, seconds, users, workers. ARGV: ttl, max samples, census cap, oldest second kept,
#       batch (JSON)
_METRICS_ADD = """
local kinds = {'hash', 'list', 'hash', 'hash', 'hash'}
for i, key in ipairs(KEYS) do  -- metrics are disposable: a key of the wrong type is dropped
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= kinds[i] then redis.call('DEL', key) end
end
local counters, latency, seconds, users = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local batch = cjson.decode(ARGV[5])
for name, value in pairs(batch.counters) do redis.call('HINCRBY', counters, name, value) end
if batch.since then redis.call('HSETNX', counters, 'since', batch.since) end
for _, sample in ipairs(batch.samples) do redis.call('LPUSH', latency, sample) end
redis.call('LTRIM', latency, 0, tonumber(ARGV[2]) - 1)
for second, value in pairs(batch.seconds) do redis.call('HINCRBY', seconds, second, value) end
for _, second in ipairs(redis.call('HKEYS', seconds)) do
  if tonumber(second) < tonumber(ARGV[4]) then redis.call('HDEL', seconds, second) end
end
for user, value in pairs(batch.census) do
  if redis.call('HEXISTS', users, user) == 1 or redis.call('HLEN', users) < tonumber(ARGV[3]) then
    redis.call('HSET', users, user, value)
  end
end
for worker, value in pairs(batch.workers) do redis.call('HSET', KEYS[5], worker, value) end
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[1]) end
"""


class RedisMetricsSink(MetricsSink):
    """Metrics in four keys beside the users', in one hash slot of their own (a reset clears the first three):

        {prefix}:metrics:{m}:counters   hash  name -> count, and `since`
        {prefix}:metrics:{m}:latency    list  "unix_ts v1 v2 ..." per sample, newest first, `max_samples` kept
        {prefix}:metrics:{m}:seconds    hash  unix second -> requests, the last `keep_seconds` kept
        {prefix}:metrics:{m}:users      hash  user id -> "bytes tokens events" of their stored state, at
                                              most `census_users` users (the first ones counted)
        {prefix}:metrics:{m}:workers    hash  worker id -> "unix_ts bytes entries max_bytes" of its hot tier

    Every key expires `ttl_s` after the last write, so a prefix nobody serves leaves nothing behind.
    """

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str, max_samples: int, census_users: int,
                 ttl_s: int, keep_seconds: int):
        self.redis = client
        self.max_samples = max_samples
        self.census_users = census_users
        self.ttl_s = ttl_s
        self.keep_seconds = keep_seconds
        base = f"{prefix}:metrics:{{m}}"
        self.counters, self.latency = f"{base}:counters", f"{base}:latency"
        self.seconds, self.users, self.workers = f"{base}:seconds", f"{base}:users", f"{base}:workers"
        self._add = client.register_script(_METRICS_ADD)

    async def add(self, batch: MetricsBatch, now: float) -> None:
        payload = {
            "counters": batch.counters or {},
            "since": None if batch.since is None else f"{batch.since:.3f}",
            "samples": [f"{at:.3f} " + " ".join(f"{v:.4f}" for v in figures) for at, figures in batch.samples],
            "seconds": {str(s): n for s, n in batch.seconds.items()},
            "census": {u: f"{c.bytes} {c.tokens} {c.events}" for u, c in batch.census.items()},
            "workers": {w: f"{g.at:.3f} {g.bytes} {g.entries} {g.max_bytes}" for w, g in batch.workers.items()},
        }
        # cjson reads an empty object as an empty table either way; `since` None is left out
        payload = {k: v for k, v in payload.items() if v is not None}
        with _unavailable(Written.UNKNOWN):
            await self._add(keys=[self.counters, self.latency, self.seconds, self.users, self.workers],
                            args=[self.ttl_s, self.max_samples, self.census_users,
                                  int(now) - self.keep_seconds, json.dumps(payload)])

    async def read(self) -> MetricsData:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.counters)
        pipe.lrange(self.latency, 0, -1)
        pipe.hgetall(self.seconds)
        pipe.hgetall(self.users)
        pipe.hgetall(self.workers)
        with _unavailable(Written.NOTHING):
            counters, samples, seconds, users, workers = await pipe.execute()
        since = counters.pop(b"since", None)
        return MetricsData(
            since=float(since) if since is not None else None,
            counters={_text(k): int(v) for k, v in counters.items()},
            samples=[[float(x) for x in s.split()[1:]] for s in samples],
            per_second={int(s): int(n) for s, n in seconds.items()},
            census={_text(u): Census(*(int(x) for x in v.split())) for u, v in users.items()},
            workers={_text(w): _gauge(v) for w, v in workers.items()})

    async def reset(self) -> None:
        with _unavailable(Written.UNKNOWN):
            await self.redis.delete(self.counters, self.latency, self.seconds)

    async def forget_user(self, user_id: str) -> None:
        with _unavailable(Written.UNKNOWN):
            await self.redis.hdel(self.users, user_id)


def _gauge(value: bytes) -> WorkerGauge:
    at, nbytes, entries, max_bytes = value.split()
    return WorkerGauge(float(at), int(nbytes), int(entries), int(max_bytes))


def _answer(value: bytes | str) -> list[str] | None:
    """The stored last answer; a damaged one grades nothing rather than failing the request."""
    try:
        answer = json.loads(value) if value else None
    except ValueError:
        return None
    return answer if isinstance(answer, list) and all(isinstance(i, str) for i in answer) else None


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
