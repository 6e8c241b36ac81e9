"""How buffer items travel as ``slime.v1.Sample`` messages, and back.

A rollout worker's item is a ``Sample.to_dict()`` and travels as that Sample. An agent's trajectory item travels
as an untokenized Sample: ``prompt`` holds the chat ``messages``, ``metadata`` the ``extra_info``, ``tokens`` is
empty and the group's id is the ``instance_id``; the trainer-side client tokenizes it (loss masks included).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.core.sample import Sample


def trajectory_to_sample(item: Mapping[str, Any]) -> Sample:
    """An agent trajectory item as the untokenized Sample it travels as."""
    instance_id = item.get("instance_id")
    return Sample(
        index=instance_id if isinstance(instance_id, int) and not isinstance(instance_id, bool) else None,
        prompt=list(item["messages"]),
        reward=item.get("reward"),
        metadata=dict(item.get("extra_info") or {}),
        uid=str(item["uid"]),
    )


def is_untokenized_trajectory(sample: Sample) -> bool:
    """Whether a Sample off the wire is an agent trajectory still to be tokenized (see module docstring)."""
    return (
        not sample.tokens
        and isinstance(sample.prompt, list)
        and bool(sample.prompt)
        and all(isinstance(message, Mapping) and "role" in message for message in sample.prompt)
    )


def sample_to_trajectory(sample: Sample, instance_id: str) -> dict[str, Any]:
    """The trajectory item an untokenized Sample carries, in slime's shape."""
    return {
        "uid": sample.uid,
        "instance_id": sample.index if sample.index is not None else instance_id,
        "messages": list(sample.prompt),
        "reward": sample.reward,
        "extra_info": dict(sample.metadata),
    }
