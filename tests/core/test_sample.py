"""Sample: slime's defaults, dict and protobuf round trips with every field set or None, and reward lookup."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from protos import slime_pb2
from services.core.sample import Sample


def full_sample(prompt: str | list[dict], reward: float | dict) -> Sample:
    return Sample(
        group_index=4,
        index=17,
        prompt=prompt,
        tokens=[151644, 872, 198, 17, 10, 17, 151645],
        response="4<|im_end|>",
        response_length=2,
        label="4",
        reward=reward,
        loss_mask=[1, 0],
        weight_versions=["3", "4"],
        rollout_log_probs=[-0.1234567890123, -2.5e-7],
        status=Sample.Status.TRUNCATED,
        metadata={
            "round_number": 2,
            "start_rollout_id": 5,
            "raw_reward": 0.5,
            "tags": ["math", None],
            "ok": True,
        },
        train_metadata={"loss": "sft", "weight": 0.75},
        uid="run-1:4:17",
    )


FULL_SAMPLES = [
    full_sample("What is 2+2?", 1.0),
    full_sample(
        [{"type": "text", "text": "What is in the image?"}, {"type": "image", "image": "img.png"}],
        {"score": -1.0, "acc": False, "pred": "3"},
    ),
]


def test_defaults_are_slimes() -> None:
    sample = Sample()
    assert (sample.group_index, sample.index, sample.prompt, sample.tokens) == (None, None, "", [])
    assert (sample.response, sample.response_length, sample.label, sample.reward) == ("", 0, None, None)
    assert (sample.loss_mask, sample.weight_versions, sample.rollout_log_probs) == (None, [], None)
    assert sample.status is Sample.Status.PENDING
    assert (sample.metadata, sample.train_metadata) == ({}, None)
    assert sample.uid and sample.uid != Sample().uid
    assert [s.value for s in Sample.Status] == ["pending", "completed", "truncated", "aborted"]
    assert Sample.Status.COMPLETED == "completed"


def test_positional_construction_follows_slimes_field_order() -> None:
    sample = Sample(1, 2, "p", [5], "r", 1)
    assert (sample.group_index, sample.index, sample.prompt, sample.tokens, sample.response) == (
        1,
        2,
        "p",
        [5],
        "r",
    )
    assert sample.response_length == 1


@pytest.mark.parametrize("sample", FULL_SAMPLES, ids=["text-prompt", "multimodal-dict-reward"])
def test_dict_round_trip_with_every_field_set(sample: Sample) -> None:
    data = sample.to_dict()
    assert data["status"] == "truncated" and type(data["status"]) is str
    assert set(data) == {
        "group_index",
        "index",
        "prompt",
        "tokens",
        "response",
        "response_length",
        "label",
        "reward",
        "loss_mask",
        "weight_versions",
        "rollout_log_probs",
        "status",
        "metadata",
        "train_metadata",
        "uid",
    }
    # The dict form is what goes into Redis and HTTP bodies: it must survive JSON.
    assert Sample.from_dict(json.loads(json.dumps(data))) == sample


@pytest.mark.parametrize("sample", FULL_SAMPLES, ids=["text-prompt", "multimodal-dict-reward"])
def test_proto_round_trip_with_every_field_set(sample: Sample) -> None:
    wire = sample.to_proto().SerializeToString()
    back = Sample.from_proto(slime_pb2.Sample.FromString(wire))
    assert back == sample
    assert back.rollout_log_probs == sample.rollout_log_probs, "log-probs must survive bit for bit"
    assert type(back.metadata["round_number"]) is int
    assert back.status is Sample.Status.TRUNCATED
    assert isinstance(back.reward, float | dict)


def test_round_trips_keep_none_distinct_from_empty() -> None:
    none_sample = Sample(prompt="p", uid="u-none")
    empty_sample = Sample(
        group_index=0,
        index=0,
        label="",
        reward=0.0,
        loss_mask=[],
        rollout_log_probs=[],
        train_metadata={},
        uid="u-0",
    )
    for sample in (none_sample, empty_sample):
        assert Sample.from_dict(sample.to_dict()) == sample
        msg = slime_pb2.Sample.FromString(sample.to_proto().SerializeToString())
        assert Sample.from_proto(msg) == sample
    msg = none_sample.to_proto()
    assert not (msg.has_label or msg.has_reward or msg.has_loss_mask or msg.has_rollout_log_probs)
    assert not msg.HasField("group_index") and not msg.HasField("train_metadata")
    assert Sample.from_proto(msg).train_metadata is None


def test_from_proto_of_an_empty_message_gives_defaults() -> None:
    sample = Sample.from_proto(slime_pb2.Sample())
    assert sample == Sample(uid="")


def test_integer_reward_comes_back_as_float() -> None:
    back = Sample.from_proto(Sample(reward=1, uid="u").to_proto())
    assert back.reward == 1.0 and type(back.reward) is float


def test_status_accepts_its_string_and_rejects_others() -> None:
    assert Sample(status="completed").status is Sample.Status.COMPLETED
    assert Sample.from_dict({"status": "aborted"}).status is Sample.Status.ABORTED
    with pytest.raises(ValueError, match="Sample.status must be one of"):
        Sample.from_dict({"status": "done"})
    msg = Sample(uid="u").to_proto()
    msg.status = "exploded"
    with pytest.raises(ValueError, match="'exploded'"):
        Sample.from_proto(msg)


def test_from_dict_names_unknown_fields_and_does_not_mutate_input() -> None:
    with pytest.raises(ValueError, match=r"\['truncated'\]"):
        Sample.from_dict({"truncated": True})
    data = Sample(status=Sample.Status.COMPLETED).to_dict()
    Sample.from_dict(data)
    assert data["status"] == "completed"


def test_to_proto_errors_name_the_field() -> None:
    with pytest.raises(TypeError, match="Sample.tokens"):
        Sample(tokens=[1, "2"]).to_proto()
    with pytest.raises(TypeError, match="Sample.label must be a str"):
        Sample(label=4).to_proto()
    with pytest.raises(TypeError, match="Sample.reward must be a number"):
        Sample(reward="high").to_proto()
    with pytest.raises(TypeError, match="Sample.prompt must be a str or a list of dicts"):
        Sample(prompt=["a", "b"]).to_proto()
    with pytest.raises(ValueError, match=r"Sample\.metadata\.ts.*too large"):
        Sample(metadata={"ts": 1_700_000_000_000_000_000}).to_proto()


def test_get_reward_value_follows_reward_key() -> None:
    plain = argparse.Namespace(reward_key=None)
    keyed = argparse.Namespace(reward_key="score")
    assert Sample(reward=0.5).get_reward_value(plain) == 0.5
    assert Sample(reward={"score": 1.0, "acc": True}).get_reward_value(keyed) == 1.0
    assert Sample(reward=0.5).get_reward_value(argparse.Namespace()) == 0.5
    with pytest.raises(TypeError, match="--reward-key 'score'"):
        Sample(reward=0.5).get_reward_value(keyed)
    with pytest.raises(KeyError, match="--reward-key 'score'"):
        Sample(reward={"acc": 1.0}).get_reward_value(keyed)


def test_nan_reward_survives_the_proto_round_trip() -> None:
    back = Sample.from_proto(Sample(reward=float("nan")).to_proto())
    assert math.isnan(back.reward)
