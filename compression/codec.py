"""One blob per user state: a fixed prefix, a small JSON header, then raw tensor bytes.

    offset 0   magic b"KVRS"
           4   format version   uint16 little-endian
           6   reserved         uint16 (0)
           8   header length    uint32, the JSON header padded with spaces to a multiple of 8
          12   reserved         uint32 (0), so that the header starts 8-byte aligned
          16   checksum         uint64 xxh3-64 over header and payload (about 15 GB/s: a 1 MiB state
                                costs 0.07 ms to check, where crc32 cost 0.6 ms, a tenth of a request)
          24   header           {"model", "policy", "events", "kind", "layers", "tensors"}: "kind" is the
                                state's kind, "layers" per layer the dense shapes of its token tensors
                                ("t") and fixed tensors ("f"); each stored tensor is "name:dtype:shape"
                                ("0.k.q:i8:2x960x32"), in payload order
           *   payload          tensors back to back, largest element size first, so every tensor is
                                aligned to its element size and decoding is `torch.frombuffer` views

Any kind of state encodes: the storage policy of the pipeline decides the parts of the state's tensors
("{layer}.{part}"); the codec adds the token metadata: pos (int32), ts (int64), weight (fp32, omitted
when all ones), extras "x.{name}" (fp32), each stored once when identical across layers ("pos") or per
layer ("pos.0"), and the last hidden state "h". A state without tokens stores no metadata.
`len(blob)` is the number that reports call bytes per user. No pickle, no floats in text.
"""

from __future__ import annotations

import json
import math
import struct
import warnings

import numpy as np
import torch
import xxhash
from kvrec.compression.base import READ
from kvrec.compression.pipeline import Pipeline
from kvrec.models.state import LayerState, State
from torch import Tensor

MAGIC = b"KVRS"
VERSION = 4  # 4: fp16 scales, sequences, KIVI runs; 3: any state kind; 2 held K/V only (older: rebuilt)
PREFIX = struct.Struct("<4sHHIIQ")  # magic, version, reserved, header length, reserved, xxh3-64
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f8": torch.float8_e4m3fn,
          "u8": torch.uint8, "i8": torch.int8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64}
CODES = {dtype: code for code, dtype in DTYPES.items()}
# numpy's name for each dtype it has: their bytes are read and written through numpy (one call per tensor,
# where torch's frombuffer/view/view take three); bf16 and fp8 go through uint8
NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.uint8: np.uint8, torch.int8: np.int8,
         torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}
DELTA_TYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


class BlobError(ValueError):
    """A blob that cannot be used as this model's state under this policy; the caller rebuilds it."""


class CorruptBlobError(BlobError):
    """Truncated, checksum mismatch or not a kvrec state blob at all."""


class ForeignBlobError(BlobError):
    """A valid blob made by another model, another policy spec or another format version."""


def encode_state(state: State, pipeline: Pipeline, model_fingerprint: str) -> bytes:
    """Serialize `state` as stored under `pipeline` (its storage stage decides the K/V encoding)."""
    return encode(state, pipeline, model_fingerprint)[0]


def encode_restored(state: State, pipeline: Pipeline, model_fingerprint: str) -> tuple[bytes, State]:
    """`encode_state`'s blob and the state that decoding it gives back (equal tensor for tensor), from
    what encoding computed rather than by reading the blob: a server that keeps the decoding of each
    blob it writes (a hot tier of decoded states) saves a decode per request, and under KIVI, which
    re-emits untouched tokens as stored, most of the dequantization (`Storage.restore`)."""
    blob, parts = encode(state, pipeline, model_fingerprint)
    storage = pipeline.storage
    dense = storage.restore(state, parts)
    layers = [LayerState({n: tensors[n] for n in part.tokens}, part.pos.long(), part.ts.long(), part.weight.float(),
                         {n: tensors[n] for n in part.fixed}) for part, tensors in zip(state.layers, dense)]
    extras = {name: [t.float() for t in per_layer] for name, per_layer in sorted(state.extras.items())
              if name not in storage.carries}
    for name in storage.carries:
        extras[name] = ([read_tag(part) for part in layers] if name == READ else [d[name] for d in dense])
    hidden = None if state.last_hidden is None else state.last_hidden.float()
    return blob, State(state.kind, layers, hidden, state.events_consumed, extras)


def read_tag(part: LayerState) -> Tensor:
    """READ of a layer as read: [2, T] float64, each token's position + 1 and weight."""
    return torch.stack([(part.pos + 1).double(), part.weight.double()])


def encode(state: State, pipeline: Pipeline, model_fingerprint: str) -> tuple[bytes, dict[str, Tensor]]:
    """The blob, and the storage's parts in it."""
    if not pipeline.keeps_state:
        raise ValueError(f"policy {pipeline.spec!r} keeps no state to encode")
    parts = dict(pipeline.storage.pack(state))
    tensors = dict(parts)
    seq = {}
    for name, per_layer in metadata(state, pipeline.storage.carries).items():
        named = ({name: per_layer[0]} if all(torch.equal(per_layer[0], t) for t in per_layer[1:])
                 else {f"{name}.{layer}": t for layer, t in enumerate(per_layer)})
        for key, t in named.items():
            if name in SEQUENCES:
                seq[key], t = sequence(t)
            if t is not None:
                tensors[key] = t
    if state.last_hidden is not None:
        tensors["h"] = state.last_hidden.float()
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())  # stable: aligned payload
    layers = [{"t": {n: list(t.shape) for n, t in part.tokens.items()},
               "f": {n: list(t.shape) for n, t in part.fixed.items()}} for part in state.layers]
    header = json.dumps({
        "model": model_fingerprint, "policy": pipeline.spec, "events": state.events_consumed,
        "kind": state.kind, "layers": layers, "seq": seq,
        "tensors": " ".join(f"{n}:{CODES[tensors[n].dtype]}:{'x'.join(map(str, tensors[n].shape))}" for n in order),
    }, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    # views of the tensors' bytes: the one copy is the final join
    body = [header] + [raw_bytes(tensors[n]) for n in order]
    checksum = xxhash.xxh3_64()
    for piece in body:
        checksum.update(piece)
    return b"".join([PREFIX.pack(MAGIC, VERSION, 0, len(header), 0, checksum.intdigest())] + body), parts


SEQUENCES = ("pos", "ts")


def raw_bytes(t: Tensor) -> np.ndarray:
    """The bytes of a CPU tensor in row-major order, as a numpy view (a copy only when not contiguous)."""
    t = t if t.is_contiguous() else t.contiguous()
    t = t.detach() if t.requires_grad else t
    return (t if t.dtype in NUMPY else t.view(torch.uint8)).numpy().reshape(-1).view(np.uint8)


def metadata(state: State, carried: tuple[str, ...]) -> dict[str, list[Tensor]]:
    """Per layer: positions and times (int64), weights unless all ones, and every extra not `carried`."""
    if not state.token_names():
        return {}
    meta = {"pos": list(state.pos), "ts": list(state.ts)}
    if not all(bool((w.numpy() == 1).all()) for w in state.weight):
        meta["w"] = [w.float() for w in state.weight]
    meta.update({f"x.{name}": [t.float() for t in per_layer] for name, per_layer in state.extras.items()
                 if name not in carried})
    return meta


def sequence(x: Tensor) -> tuple[list[int | None], Tensor | None]:
    """A position or time sequence x [T] -> ([first, stride], None) when x[i] = first + stride * i
    (nothing stored but the header's two numbers), else ([first, None], deltas [T - 1] in the narrowest
    of int8/16/32/64 that holds them: times a minute apart take a byte). In numpy: on vectors of a few
    thousand, each torch call costs 5-20 us of overhead, a numpy one about 1."""
    x = x.long().numpy()
    if len(x) == 0:
        return [0, 0], None
    deltas = np.diff(x)
    if len(deltas) == 0 or bool((deltas == deltas[0]).all()):
        return [int(x[0]), int(deltas[0]) if len(deltas) else 0], None
    lo, hi = int(deltas.min()), int(deltas.max())
    dtype = next(t for t in DELTA_TYPES if torch.iinfo(t).min <= lo and hi <= torch.iinfo(t).max)
    return [int(x[0]), None], torch.from_numpy(deltas.astype(NUMPY[dtype]))


def unsequence(entry: list, deltas: Tensor | None, tokens: int) -> Tensor:
    """Inverse of `sequence`: the [T] int64 sequence from its header entry (and deltas)."""
    first, stride = int(entry[0]), entry[1]
    if stride is not None:
        return torch.from_numpy(np.arange(first, first + int(stride) * tokens, int(stride)) if stride
                                else np.full(tokens, first))
    out = np.empty(len(deltas) + 1, np.int64)
    out[0] = first
    np.cumsum(deltas.numpy(), out=out[1:])
    out[1:] += first
    return torch.from_numpy(out)


def read_header(blob: bytes) -> tuple[dict, int]:
    """The header of a blob (checked for magic, version and checksum) and where its payload starts."""
    if len(blob) < PREFIX.size:
        raise CorruptBlobError(f"blob of {len(blob)} bytes is shorter than the {PREFIX.size}-byte prefix")
    magic, version, _, header_len, _, checksum = PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptBlobError(f"not a kvrec state blob (magic {bytes(magic)!r})")
    if version != VERSION:
        raise ForeignBlobError(f"blob format version {version}, this code reads version {VERSION}")
    if PREFIX.size + header_len > len(blob):
        raise CorruptBlobError(f"truncated blob: header of {header_len} bytes, blob of {len(blob)}")
    if xxhash.xxh3_64_intdigest(memoryview(blob)[PREFIX.size:]) != checksum:
        raise CorruptBlobError("blob checksum mismatch (truncated or corrupted)")
    try:
        header = json.loads(bytes(memoryview(blob)[PREFIX.size:PREFIX.size + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptBlobError(f"unreadable blob header: {exc}") from exc
    if not isinstance(header, dict):
        raise CorruptBlobError(f"blob header is a JSON {type(header).__name__}, not an object")
    return header, PREFIX.size + header_len


def decode_state(blob: bytes, pipeline: Pipeline, model_fingerprint: str) -> State:
    """Dense fp32 state from a blob; the tensors of fp32 parts are views of the blob's bytes (read-only)."""
    header, payload = read_header(blob)
    if header.get("model") != model_fingerprint:
        raise ForeignBlobError(f"blob made by model {header.get('model')!r}, not {model_fingerprint!r}")
    if header.get("policy") != pipeline.spec:
        raise ForeignBlobError(f"blob made under policy {header.get('policy')!r}, not {pipeline.spec!r}")
    try:
        tensors = views(blob, payload, header["tensors"])
        layers = header["layers"]
        shapes = [{**layer["t"], **layer["f"]} for layer in layers]
        storage = pipeline.storage
        dense = storage.unpack({n: t for n, t in tensors.items() if n[0].isdigit()}, shapes)
        tokens = [next(iter(layer["t"].values()))[1] if layer["t"] else 0 for layer in layers]
        has_tokens = any(layer["t"] for layer in layers)
        seq = header["seq"]

        def per_layer(name: str, default) -> list[Tensor]:
            if name in tensors or name in seq:
                return [read(name, t) for t in tokens]
            if f"{name}.0" in tensors or f"{name}.0" in seq:
                return [read(f"{name}.{layer}", t) for layer, t in enumerate(tokens)]
            return [default(t) for t in tokens]

        def read(key: str, t: int) -> Tensor:
            return unsequence(seq[key], tensors.get(key), t) if key.split(".")[0] in SEQUENCES else tensors[key]

        empty = lambda t: torch.zeros(t, dtype=torch.long)
        pos, ts = per_layer("pos", empty), per_layer("ts", empty)
        weight = per_layer("w", lambda t: torch.ones(t))
        parts = [LayerState({n: tensors_of[n] for n in layer["t"]}, p, t, w, {n: tensors_of[n] for n in layer["f"]})
                 for layer, tensors_of, p, t, w in zip(layers, dense, pos, ts, weight)]
        if has_tokens and any(part.num_tokens != t or len(part.ts) != t for part, t in zip(parts, tokens)):
            raise ValueError("token metadata does not match the token tensors")
        extras = {name: per_layer(f"x.{name}", None) for name in sorted({n.split(".")[1] for n in tensors
                                                                           if n.startswith("x.")})}
        for name in storage.carries:  # the storage's own record, and READ as this blob was read
            extras[name] = [read_tag(part) for part in parts] if name == READ else [d.pop(name) for d in dense]
        return State(kind=header["kind"], layers=parts, last_hidden=tensors.get("h"),
                     events_consumed=int(header["events"]), extras=extras)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError, StopIteration) as exc:
        raise CorruptBlobError(f"blob does not match its header: {exc}") from exc


def views(blob: bytes, offset: int, table: str) -> dict[str, Tensor]:
    """Tensors described by the header's table ("name:dtype:shape ..."), as views of the blob from `offset`."""
    out = {}
    with warnings.catch_warnings():  # the blob is immutable bytes; the views are never written to
        warnings.simplefilter("ignore", UserWarning)
        for entry in table.split():
            name, code, shape_text = entry.split(":")
            shape = [int(s) for s in shape_text.split("x")] if shape_text else []
            dtype = DTYPES[code]
            nbytes = math.prod(shape) * dtype.itemsize
            if offset + nbytes > len(blob):
                raise ValueError(f"tensor {name} runs past the end of the blob")
            if dtype in NUMPY:
                out[name] = torch.from_numpy(np.frombuffer(blob, NUMPY[dtype], math.prod(shape), offset).reshape(shape))
            else:
                out[name] = torch.from_numpy(np.frombuffer(blob, np.uint8, nbytes, offset)).view(dtype).view(shape)
            offset += nbytes
    if offset != len(blob):
        raise ValueError(f"{len(blob) - offset} bytes after the last tensor")
    return out

