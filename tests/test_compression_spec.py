"""The spec grammar: canonical printing, composition rules, and errors that say what is valid."""

from __future__ import annotations

import pytest
from kvrec.compression import PolicyError, all_policies, parse_policy


@pytest.mark.parametrize("spec, canonical", [
    ("full", "full"),
    ("recompute", "recompute"),
    ("int8", "int8"),
    ("kivi:bits=2,residual=32", "kivi:bits=2,residual=32,group=32"),
    ("h2o:budget=256,recent=64", "h2o:budget=256,recent=64"),
    ("h2o", "h2o:budget=256"),
    (" streaming:sink=4,window=252 + int8 ", "streaming:sink=4,window=252+int8"),
    ("h2o:bytes=65536+int4", "h2o:bytes=65536+int4:group=32"),
    ("window:budget=64+full", "window:budget=64"),
    ("minicache:threshold=0.75", "minicache:threshold=0.75,dtype=fp32"),
])
def test_canonical_spec_round_trips(spec, canonical):
    pipeline = parse_policy(spec)
    assert pipeline.spec == canonical
    assert parse_policy(pipeline.spec) == pipeline


def test_every_policy_parses_by_name_alone():
    for name in all_policies():
        if name != "svd":  # needs a model to find its bases
            assert parse_policy(name).spec.split(":")[0] == name


def test_keeps_state():
    assert not parse_policy("recompute").keeps_state
    assert parse_policy("h2o+kivi").keeps_state


@pytest.mark.parametrize("spec, needle", [
    ("nope", "policies: ada, bf16, fp16"),
    ("h2o:budgt=3", "valid: budget (int"),
    ("h2o:budget=abc", "budget must be int"),
    ("h2o:budget=0", "budget must be >= 1"),
    ("h2o:budget=8,bytes=100", "not both"),
    ("kivi:bits=3", "bits must be 2 or 4"),
    ("h2o+window", "at most one token policy"),
    ("int8+h2o", "at most one token policy"),
    ("int8+int4", "followed by at most one storage policy"),
    ("recompute+int8", "cannot be combined"),
    ("svd:rank=4", "needs a PolicyContext"),
    ("", "empty policy spec"),
    ("h2o:budget", "bad parameter"),
])
def test_bad_specs_say_what_is_valid(spec, needle):
    with pytest.raises(PolicyError, match=None) as info:
        parse_policy(spec)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_bad_parameter_lists_the_defaults_a_bare_spec_gets():
    with pytest.raises(PolicyError) as info:
        parse_policy("h2o:buget=10")
    assert "budget (int, default 256)" in str(info.value) and "recent (int, default half the budget)" in str(info.value)


def test_kivi_refuses_a_budget_that_leaves_nothing_to_quantize():
    """StreamingLLM's 32 tokens under a 32-token residual: KIVI would store every kept token exact."""
    with pytest.raises(PolicyError, match="nothing would ever be quantized"):
        parse_policy("streaming:sink=4,window=28+kivi:bits=2,residual=32")
