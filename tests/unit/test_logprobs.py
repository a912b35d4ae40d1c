"""Log-probability fields of SamplingParams: out-of-range values named, the limits accepted."""

from __future__ import annotations

import pytest

from engines import SamplingParams
from engines.errors import InvalidRequest


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(logprobs=21), "logprobs"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=True), "logprobs"),
        (dict(logprobs=1.5), "logprobs"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=0, logprobs=1), "max_new_tokens"),
        (dict(max_new_tokens=-1, prompt_logprobs=1), "max_new_tokens"),
    ],
)
def test_out_of_range_logprobs_name_the_field(fields, field):
    with pytest.raises(InvalidRequest, match=field) as refused:
        SamplingParams(**fields)
    assert refused.value.field == field


def test_limits_are_accepted():
    assert SamplingParams(logprobs=0, prompt_logprobs=20).prompt_logprobs == 20
    assert SamplingParams(max_new_tokens=0, prompt_logprobs=0).max_new_tokens == 0
