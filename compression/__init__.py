"""Policies that shrink a per-user attention state, their spec grammar, the state codec, offline benchmark.

    pipeline = parse_policy("h2o:budget=256,recent=64+kivi:bits=2", PolicyContext(model=...))
    state = pipeline.compress(state, stats)            # after every extend
    blob = encode_state(state, pipeline, fingerprint)  # len(blob) is bytes per user
    state = decode_state(blob, pipeline, fingerprint)  # dense fp32 again
"""

from kvrec.compression.base import PolicyContext
from kvrec.compression.codec import BlobError, CorruptBlobError, ForeignBlobError, decode_state, encode_state
from kvrec.compression.pipeline import Pipeline
from kvrec.compression.registry import all_policies
from kvrec.compression.spec import PolicyError, parse_policy

__all__ = ["BlobError", "CorruptBlobError", "ForeignBlobError", "Pipeline", "PolicyContext", "PolicyError",
           "decode_state", "encode_state", "all_policies", "parse_policy"]
