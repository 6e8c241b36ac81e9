"""Wire models: SGLang's /generate request/response names, defaults and checks, reward requests, trajectories."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from services.core.wire import (
    GenerateRequest,
    GenerateResponse,
    RewardRequest,
    SamplingParams,
    TrajectoryItem,
)


def errors(model: type[BaseModel], data: dict[str, Any]) -> dict[tuple, str]:
    with pytest.raises(ValidationError) as excinfo:
        model.model_validate(data)
    return {tuple(e["loc"]): e["msg"] for e in excinfo.value.errors()}


def test_slimes_generate_payload_is_accepted_as_sent() -> None:
    payload = {
        "input_ids": [151644, 872, 198],
        "sampling_params": {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": -1,
            "max_new_tokens": 1024,
            "stop": None,
            "stop_token_ids": None,
            "skip_special_tokens": False,
            "no_stop_trim": True,
            "spaces_between_special_tokens": False,
            "sampling_seed": 42,
        },
        "return_logprob": True,
    }
    request = GenerateRequest.model_validate(payload)
    params = request.sampling_params
    assert isinstance(params, SamplingParams)
    assert (params.max_new_tokens, params.no_stop_trim, params.skip_special_tokens, params.sampling_seed) == (
        1024,
        True,
        False,
        42,
    )
    assert not request.is_batch and request.batch_size == 1 and request.split() == [request]
    assert request.model_dump(exclude_unset=True)["sampling_params"]["max_new_tokens"] == 1024


def test_sampling_defaults_are_sglangs_and_null_means_default() -> None:
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens, params.min_new_tokens) == (
        1.0,
        1.0,
        -1,
        128,
        0,
    )
    assert (params.skip_special_tokens, params.spaces_between_special_tokens, params.no_stop_trim) == (
        True,
        True,
        False,
    )
    assert params.ignore_eos is False and params.stop is None and params.sampling_seed is None
    nulls = SamplingParams.model_validate({"temperature": None, "top_k": None, "skip_special_tokens": None})
    assert (nulls.temperature, nulls.top_k, nulls.skip_special_tokens) == (1.0, -1, True)
    assert nulls.model_fields_set == set()
    assert SamplingParams.model_validate({"max_new_tokens": None}).max_new_tokens is None


@pytest.mark.parametrize(
    ("params", "field", "fragment"),
    [
        ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"temperature": float("inf")}, "temperature", "finite"),
        ({"top_p": 0.0}, "top_p", "greater than 0"),
        ({"top_p": 1.01}, "top_p", "less than or equal to 1"),
        ({"top_k": 0}, "top_k", "-1 (all tokens) or at least 1"),
        ({"top_k": -2}, "top_k", "-1 (all tokens) or at least 1"),
        ({"max_new_tokens": -1}, "max_new_tokens", "greater than or equal to 0"),
        ({"min_new_tokens": -1}, "min_new_tokens", "greater than or equal to 0"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens", "max_new_tokens=4"),
        ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"regex": "a+", "json_schema": "{}"}, "ebnf", "only one of json_schema, regex or ebnf"),
        ({"temprature": 0.5}, "temprature", "Extra inputs are not permitted"),
    ],
)
def test_bad_sampling_params_name_the_field(params: dict, field: str, fragment: str) -> None:
    found = errors(GenerateRequest, {"text": "hi", "sampling_params": params})
    assert ("sampling_params", field) in found, found
    assert fragment in found[("sampling_params", field)]


def test_edge_values_sglang_accepts() -> None:
    params = SamplingParams(temperature=0, top_p=1, top_k=1, max_new_tokens=0, min_new_tokens=0)
    assert params.temperature == 0.0 and params.max_new_tokens == 0
    assert SamplingParams(top_k=-1, top_p=1e-9).top_k == -1


def test_prompt_must_be_exactly_one_of_text_or_input_ids() -> None:
    assert errors(GenerateRequest, {})[("input_ids",)].endswith(
        "exactly one of text or input_ids is required"
    )
    assert errors(GenerateRequest, {"text": "a", "input_ids": [1]})[("input_ids",)].endswith("not both")
    assert errors(GenerateRequest, {"input_ids": []})[("input_ids",)].endswith("must not be empty")
    assert errors(GenerateRequest, {"text": []})[("text",)].endswith("at least one prompt")
    assert ("input_ids", 1) in errors(GenerateRequest, {"input_ids": [1, -5]})
    assert GenerateRequest(text="").text == ""


def test_batch_form_checks_lengths_and_splits_like_sglang() -> None:
    request = GenerateRequest.model_validate(
        {
            "input_ids": [[1, 2], [3]],
            "sampling_params": [{"temperature": 0}, {"max_new_tokens": 8}],
            "return_logprob": True,
            "rid": "batch",
            "image_data": ["a.png", "b.png"],
            "logprob_start_len": -1,
        }
    )
    assert request.is_batch and request.batch_size == 2
    first, second = request.split()
    assert (first.input_ids, first.rid, first.image_data, first.return_logprob) == (
        [1, 2],
        "batch_0",
        "a.png",
        True,
    )
    assert (second.input_ids, second.rid, second.sampling_params.max_new_tokens) == ([3], "batch_1", 8)
    assert first.sampling_params.temperature == 0.0
    assert first.model_extra == {"logprob_start_len": -1}
    texts = GenerateRequest(text=["x", "y"], rid=["r1", "r2"]).split()
    assert [(r.text, r.rid, r.input_ids) for r in texts] == [("x", "r1", None), ("y", "r2", None)]

    found = errors(GenerateRequest, {"text": ["a", "b"], "sampling_params": [{}], "rid": ["1", "2", "3"]})
    assert found[("sampling_params",)].endswith("has 1 entries for a batch of 2 prompts")
    assert found[("rid",)].endswith("has 3 entries for a batch of 2 prompts")
    single = errors(GenerateRequest, {"text": "a", "return_logprob": [True]})
    assert "needs a batch of prompts" in single[("return_logprob",)]
    assert ("sampling_params", 1, "top_p") in errors(
        GenerateRequest, {"text": ["a", "b"], "sampling_params": [{}, {"top_p": 2}]}
    )


def test_single_prompt_may_carry_several_images() -> None:
    request = GenerateRequest(text="<image><image> compare", image_data=["a", "b"])
    assert request.image_data == ["a", "b"]


def test_generate_response_parses_sglang_output_and_serialises_the_same_shape() -> None:
    body = {
        "text": "4",
        "output_ids": [19, 151645],
        "meta_info": {
            "id": "abc",
            "finish_reason": {"type": "stop", "matched": 151645},
            "prompt_tokens": 12,
            "completion_tokens": 2,
            "cached_tokens": 0,
            "output_token_logprobs": [[-0.01, 19, None], [-0.5, 151645, None]],
            "weight_version": "default",
            "e2e_latency": 0.03,
        },
    }
    response = GenerateResponse.model_validate(body)
    assert response.meta_info.output_token_logprobs[1] == (-0.5, 151645, None)
    assert response.meta_info.finish_reason.type == "stop"
    assert response.model_dump(mode="json") == body

    length = GenerateResponse.model_validate(
        {
            "text": "",
            "meta_info": {"id": "x", "finish_reason": {"type": "length", "length": 16}, "weight_version": 3},
        }
    )
    assert length.model_dump(mode="json")["meta_info"]["finish_reason"] == {"type": "length", "length": 16}
    assert length.meta_info.weight_version == "3"
    abort = {"type": "abort", "message": "Abort in waiting queue", "status_code": 503}
    assert (
        GenerateResponse.model_validate(
            {"text": "", "meta_info": {"id": "x", "finish_reason": abort}}
        ).model_dump(mode="json")["meta_info"]["finish_reason"]
        == abort
    )
    assert ("meta_info", "finish_reason", "type") in errors(
        GenerateResponse, {"text": "", "meta_info": {"id": "x", "finish_reason": {"type": "eos"}}}
    )


def test_reward_request_takes_what_slimes_remote_rm_posts() -> None:
    request = RewardRequest.model_validate({"prompt": "2+2?", "response": "4", "label": "4"})
    assert (request.prompt, request.response, request.label, request.metadata) == ("2+2?", "4", "4", {})
    numeric = RewardRequest.model_validate(
        {"prompt": [{"role": "user", "content": "hi"}], "response": "", "label": 7}
    )
    assert numeric.label == "7"
    assert RewardRequest.model_validate({"prompt": "p", "response": "r", "uid": "x"}).label is None
    assert ("response",) in errors(RewardRequest, {"prompt": "p"})


def test_trajectory_item_validates_slimes_buffer_item() -> None:
    item = TrajectoryItem.model_validate(
        {
            "uid": "traj-1",
            "instance_id": 12,
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "step_loss_mask": 1},
            ],
            "reward": 1,
            "extra_info": {"finish_reason": "stop", "round_number": 0},
            "timestamp": 1.5,
        }
    )
    assert item.instance_id == 12 and item.reward == 1.0
    assert item.messages[1].step_loss_mask == 1 and item.messages[0].step_loss_mask is None
    assert item.model_extra == {"timestamp": 1.5}
    assert TrajectoryItem.model_validate({**item.model_dump(), "instance_id": "q-12"}).instance_id == "q-12"

    found = errors(
        TrajectoryItem,
        {
            "uid": "",
            "instance_id": 1,
            "messages": [{"role": "assistant", "content": "x", "step_loss_mask": 2}],
            "reward": float("nan"),
        },
    )
    assert set(found) == {("uid",), ("messages", 0, "step_loss_mask"), ("reward",)}
    assert ("messages",) in errors(
        TrajectoryItem, {"uid": "u", "instance_id": 1, "messages": [], "reward": 0}
    )
    assert ("reward",) in errors(
        TrajectoryItem, {"uid": "u", "instance_id": 1, "messages": [{"role": "user"}]}
    )
