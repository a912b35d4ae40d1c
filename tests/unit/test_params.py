import math

import pytest

from engines.errors import InvalidRequest
from engines.params import SamplingParams, check_against_model


@pytest.mark.parametrize(
    "fields, field_named",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=2.01), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=-0.5), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=1e-30), "repetition_penalty"),
        (dict(repetition_penalty=1e30), "repetition_penalty"),
        (dict(stop=("",)), "stop"),
        (dict(stop=tuple(f"s{i}" for i in range(1000))), "stop"),
        (dict(stop=("x" * 10_000,)), "stop"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
        (dict(stop_token_ids=(True,)), "stop_token_ids"),
        (dict(stop_token_ids=("2",)), "stop_token_ids"),
        (dict(stop_token_ids=tuple(range(1000))), "stop_token_ids"),
    ],
)
def test_out_of_range_values_name_the_field(fields, field_named):
    with pytest.raises(InvalidRequest, match=field_named):
        SamplingParams(**fields)


def test_defaults_are_greedy_and_valid():
    params = SamplingParams()
    assert params.greedy and params.max_new_tokens == 128 and params.stop == ()


def test_vanishing_temperature_is_greedy():
    # As in vLLM: logits divided by 1e-40 overflow, and sampling from them gave INTERNAL (found by test_fuzz).
    assert SamplingParams(temperature=1e-40).greedy and not SamplingParams(temperature=1e-4).greedy


def test_frozen():
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]


def test_context_checks_give_the_numbers():
    with pytest.raises(InvalidRequest, match="prompt is 100 tokens but the model's context is 100"):
        check_against_model(SamplingParams(max_new_tokens=1), 100, 100, 1000)
    with pytest.raises(InvalidRequest, match="ask for at most 10"):
        check_against_model(SamplingParams(max_new_tokens=11), 90, 100, 1000)
    check_against_model(SamplingParams(max_new_tokens=10), 90, 100, 1000)


def test_stop_token_ids_must_be_in_the_vocabulary():
    params = SamplingParams(max_new_tokens=8, stop_token_ids=[5, 99])
    assert params.stop_token_ids == (5, 99)
    check_against_model(params, prompt_tokens=3, max_context=64, vocab_size=100)
    with pytest.raises(InvalidRequest, match="below 99; got 99") as error:
        check_against_model(params, prompt_tokens=3, max_context=64, vocab_size=99)
    assert error.value.field == "stop_token_ids"


def test_a_stop_token_id_ends_the_completion_without_its_text_even_with_ignore_eos():
    from engines.completion import Completion

    completion = Completion(
        lambda ids: "".join(chr(97 + i) for i in ids), SamplingParams(stop_token_ids=(3,), ignore_eos=True), {2}, 1
    )
    assert completion.add(0) == ("a", None)
    assert completion.add(2) == ("c", None)  # the model's own EOS, ignored
    assert completion.add(3) == ("", "stop")
