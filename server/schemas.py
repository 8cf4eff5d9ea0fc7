"""Request and response bodies of the HTTP API (they are also its OpenAPI documentation).

Types are strict: `"k": "10"` or `"ts": true` is an error that names the field rather than a guess.
Limits that depend on the settings (k, list lengths, id lengths) are checked by the pipeline.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

MAX_TS = 2**53  # timestamps are compared in Redis Lua, whose numbers are doubles

Id = Annotated[StrictStr | StrictInt, Field(description="the dataset's own id, a string or an integer")]


class Event(BaseModel):
    """One interaction of the user with an item."""

    model_config = ConfigDict(extra="forbid")

    item_id: Id
    ts: StrictInt = Field(ge=-MAX_TS, le=MAX_TS,
                          description="unix seconds (or the event index); not earlier than the user's last event")
    action: StrictInt = Field(0, ge=0, le=65535, description="action id, e.g. a rating; 0 means none")


class RecommendRequest(BaseModel):
    """Fold the user's new events into their state and rank items for them."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "user_id": "u42", "events": [{"item_id": "1193", "ts": 978300760, "action": 4}],
        "candidates": ["1", "2"], "k": 10, "exclude_seen": True}]})

    user_id: Id
    events: list[Event] = Field(default_factory=list, description="new events, oldest first; may be empty")
    candidates: list[Id] | None = Field(
        None, description="items to rank; null or absent ranks the whole catalogue")
    k: StrictInt = Field(10, description="how many items to return (1 to the server's max_k)")
    exclude_seen: bool = Field(
        False, description="leave the items of the user's event log out of a whole-catalogue ranking "
                           "(explicit candidates are always all ranked)")


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="cosine of the user's state and the item's embedding")


class StateInfo(BaseModel):
    """The user's state after this request."""

    events_seen: int = Field(description="events folded into the state (the user's whole log)")
    tokens_kept: int = Field(description="tokens the policy kept, summed over layers")
    bytes: int = Field(description="size of the stored state blob; 0 when the policy keeps no state")
    source: Literal["hit", "miss", "rebuild", "recompute"] = Field(
        description="hit: a stored state was extended; miss: none was stored, built from the event log; "
                    "rebuild: the stored one was unusable (corrupt, another model or policy); "
                    "recompute: the policy keeps no state")


class RecommendResponse(BaseModel):
    user_id: str
    items: list[ScoredItem] = Field(description="best first, min(k, candidates) long")
    policy: str = Field(description="canonical spec of the compression policy")
    state: StateInfo
    timing_ms: dict[str, float] = Field(
        description="milliseconds per stage: append, load, decode, extend, compress, encode, store, score, "
                    "and total")


class HistoryRequest(BaseModel):
    """A user's whole history, replacing whatever was stored for them."""

    model_config = ConfigDict(extra="forbid")

    events: list[Event] = Field(description="events, oldest first")


class HistoryResponse(BaseModel):
    user_id: str
    policy: str
    state: StateInfo
    timing_ms: dict[str, float]


class DeleteResponse(BaseModel):
    user_id: str
    keys_deleted: int = Field(description="Redis keys removed (event log, metadata, state)")


class Problem(BaseModel):
    """An error: `detail` says what is wrong."""

    detail: str
