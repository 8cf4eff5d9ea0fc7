"""The Redis side of the service: per-user keys, the event log, and the compare-and-set state write.

Per user there are three keys, all with the encoded user id inside one hash tag so that they land on one
Redis Cluster slot and a Lua script may touch them together:

    {prefix}:{<uid>}:events  list   packed events, oldest first, trimmed to the newest `max_log_events`
    {prefix}:{<uid>}:meta    hash   n (events ever appended), last_ts, epoch, topk (the last answer)
    {prefix}:{<uid>}:state   hash   seq (events folded in), epoch, blob (the encoded state)

The event log is the source of truth; a state is a cache of "the first `seq` events under the policy".
An event's sequence number is its absolute position, `n - len(list) + index`, so trimming the list never
renumbers events. `epoch` is a random id given to a user's log when it is created: deleting or replacing
a user starts a new epoch, so a request still in flight for the old one can never write its state back.

Every write is one Lua script, so a request that is rejected (a timestamp earlier than the user's last
event) writes nothing, and two requests for one user can interleave freely: appends are atomic, and a
state is stored only if it has folded in more events than the one already there.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from urllib.parse import quote

import redis.asyncio as redis

EVENT = struct.Struct("<qH")  # ts, action; followed by the item id as UTF-8


def pack_event(item_id: str, ts: int, action: int) -> bytes:
    return EVENT.pack(ts, action) + item_id.encode()


def unpack_event(entry: bytes) -> tuple[str, int, int]:
    """-> (item_id, ts, action)."""
    ts, action = EVENT.unpack_from(entry)
    return entry[EVENT.size:].decode(), ts, action


def user_tag(user_id: str) -> str:
    """The user id as key material: percent-encoded, so it holds no `{`, `}` or `:` and no two ids meet."""
    return quote(user_id, safe="")


class TimestampError(ValueError):
    """New events start before the user's last stored event."""

    def __init__(self, first_ts: int, last_ts: int):
        super().__init__(f"events[0].ts={first_ts} is earlier than the user's last event (ts={last_ts}); "
                         "events must arrive in time order")


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


@dataclass
class Appended:
    events_total: int  # events ever appended to the user's log (the next event's sequence number)
    epoch: str  # '' while the user has no log
    previous_topk: bytes  # the user's last answer as stored by `store` ('' when none or no new events)


@dataclass
class Loaded:
    events_total: int
    epoch: str
    state_seq: int  # events the stored state has folded in; MISSING or UNUSABLE
    blob: bytes
    log_start: int  # sequence number of the oldest event the log still holds
    entries_from: int  # sequence number of entries[0]
    entries: list[bytes]  # packed events from entries_from to the end of the log

    MISSING = -1
    UNUSABLE = -2  # another epoch, or older than the log's oldest kept event


class UserStore:
    """Per-user event logs and state blobs in one Redis database, behind a key prefix."""

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

    def keys(self, user_id: str) -> tuple[str, str, str]:
        """-> (events, meta, state) keys of one user."""
        base = f"{self.prefix}:{{{user_tag(user_id)}}}"
        return f"{base}:events", f"{base}:meta", f"{base}:state"

    async def append(self, user_id: str, events: list[tuple[str, int, int]], replace: bool = False) -> Appended:
        """Append (item_id, ts, action) events in time order; with `replace`, the user's log, state and
        last answer are dropped first, in the same atomic step. Raises TimestampError, writing nothing,
        when the first event is older than the last stored one."""
        first_ts, last_ts = (events[0][1], events[-1][1]) if events else (0, 0)
        reply = await self._append(
            keys=self.keys(user_id),
            args=[self.max_log_events, self.events_ttl_s, uuid.uuid4().hex, first_ts, last_ts, int(replace),
                  *(pack_event(*e) for e in events)])
        if reply[0] == -1:
            raise TimestampError(first_ts, int(reply[1]))
        return Appended(int(reply[0]), _text(reply[1]), reply[2] or b"")

    async def load(self, user_id: str, want_state: bool, want_all: bool) -> Loaded:
        """The user's state blob (when `want_state`) and the log entries it has not folded in yet, or the
        whole log when `want_all` or when there is no usable state."""
        n, epoch, seq, blob, start, first, entries = await self._load(
            keys=self.keys(user_id), args=[int(want_state), int(want_all)])
        return Loaded(int(n), _text(epoch), int(seq), blob or b"", int(start), int(first), list(entries))

    async def store(self, user_id: str, epoch: str, seq: int, blob: bytes | None, topk: bytes) -> int:
        """Compare-and-set: write `blob` (the state after `seq` events) only if no state of at least `seq`
        events of this epoch is stored, and record `topk` as the user's last answer. `blob=None` records
        only the answer. -> 1 written, 0 a fresher state was there, -1 the user is gone."""
        _, meta, state = self.keys(user_id)
        return int(await self._store(
            keys=[state, meta],
            args=[seq, epoch, self.state_ttl_s, blob or b"", topk, int(blob is not None)]))

    async def delete(self, user_id: str) -> int:
        """Forget a user: log, state and last answer. -> keys removed."""
        return int(await self.redis.delete(*self.keys(user_id)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
