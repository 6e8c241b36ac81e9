"""Prompt data: reading jsonl/parquet prompt files and handing out groups of samples, resumably.

Behaviour follows slime's ``Dataset`` and ``RolloutDataSourceWithBuffer`` (``--prompt-data`` with ``path@[a:b]``,
``--input-key``/``--label-key``/``--metadata-key``/``--tool-key``/``--multimodal-keys``, ``--apply-chat-template``,
``--rollout-max-prompt-len``, ``--rollout-shuffle`` reseeded per epoch) with two of its gaps closed: multimodal keys
apply to training data too, and a metadata column holding a JSON string is decoded.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.sample import Sample
from trainer.rollout.filters import pop_first

logger = logging.getLogger(__name__)

_SLICE = re.compile(r"^(?P<path>.+)@\[(?P<start>-?\d*):(?P<end>-?\d*)\]$")


def parse_data_path(spec: str) -> tuple[str, int | None, int | None]:
    """Split slime's ``path@[start:end]`` row-slice syntax; a plain path has no slice."""
    match = _SLICE.match(spec)
    if not match:
        return spec, None, None
    start, end = match["start"], match["end"]
    return match["path"], int(start) if start else None, int(end) if end else None


def read_rows(spec: str) -> list[dict[str, Any]]:
    """Read every row of a ``.jsonl`` or ``.parquet`` file, applying an optional ``@[a:b]`` slice."""
    path, start, end = parse_data_path(spec)
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"prompt data file not found: {path}")
    if file.suffix == ".jsonl":
        with file.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    elif file.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(file).to_pylist()
    else:
        raise ValueError(f"unsupported prompt data format {file.suffix!r} for {path}: use .jsonl or .parquet")
    return rows[start:end]


@dataclass
class PromptRecord:
    prompt: str | list[dict[str, Any]]
    label: str | None
    metadata: dict[str, Any]
    tools: list[Any] | None = None


def _as_tools(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list):
        raise ValueError(f"tools must be a list, got {type(value).__name__}")
    return value


def _as_metadata(value: Any) -> dict[str, Any]:
    if not value:
        return {}
    if isinstance(value, str):
        decoded = json.loads(value)
        return decoded if isinstance(decoded, dict) else {"value": decoded}
    return dict(value)


@dataclass
class DatasetKeys:
    input_key: str = "input"
    label_key: str | None = None
    metadata_key: str = "metadata"
    tool_key: str | None = None
    multimodal_keys: dict[str, str] | None = None


class PromptDataset:
    """All prompts of one file, formatted (chat template, multimodal parts) and length-filtered at load time."""

    def __init__(
        self,
        spec: str,
        *,
        keys: DatasetKeys,
        tokenizer: Any = None,
        apply_chat_template: bool = False,
        max_prompt_len: int | None = None,
        seed: int = 42,
    ):
        self.spec = spec
        self.seed = seed
        self.records: list[PromptRecord] = []
        dropped = 0
        for i, row in enumerate(read_rows(spec)):
            if keys.input_key not in row:
                raise KeyError(f"row {i} of {spec} has no {keys.input_key!r} field (set --input-key)")
            tools = _as_tools(row.get(keys.tool_key)) if keys.tool_key else None
            prompt = row[keys.input_key]
            if apply_chat_template:
                if tokenizer is None:
                    raise ValueError("--apply-chat-template needs a tokenizer (--hf-checkpoint)")
                messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
                prompt = tokenizer.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=True
                )
            if keys.multimodal_keys:
                parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
                for kind, column in keys.multimodal_keys.items():
                    for item in row.get(column) or []:
                        parts.append({"type": kind, "path": item})
                prompt = parts
            elif (
                max_prompt_len is not None
                and tokenizer is not None
                and len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > max_prompt_len
            ):
                dropped += 1
                continue
            label = row.get(keys.label_key) if keys.label_key else None
            self.records.append(
                PromptRecord(
                    prompt=prompt,
                    label=None if label is None else str(label),
                    metadata=_as_metadata(row.get(keys.metadata_key)),
                    tools=tools,
                )
            )
        if dropped:
            logger.info("dropped %d prompts of %s longer than --rollout-max-prompt-len", dropped, spec)
        if not self.records:
            raise ValueError(f"no usable prompts in {spec}")
        self.order = list(range(len(self.records)))

    def __len__(self) -> int:
        return len(self.records)

    def shuffle(self, epoch_id: int) -> None:
        """Reorder deterministically for ``epoch_id``: the same seed and epoch always give the same order."""
        self.order = list(range(len(self.records)))
        random.Random(self.seed + epoch_id).shuffle(self.order)

    def __getitem__(self, position: int) -> PromptRecord:
        return self.records[self.order[position]]


BufferFilter = Callable[[Any, int | None, list[list[Sample]], int], list[list[Sample]]]


@dataclass
class DataSourceState:
    sample_offset: int = 0
    epoch_id: int = 0
    sample_group_index: int = 0
    sample_index: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


class RolloutDataSource:
    """Hands out prompt groups of ``n_samples_per_prompt`` samples, wraps epochs, and keeps partial groups.

    Groups returned by a rollout that was cut short (``--partial-rollout``) are kept in ``buffer`` and served first,
    through the ``--buffer-filter-path`` function. Unlike slime, that buffer is part of the saved state, so a resumed
    run does not lose the partial samples it held.
    """

    def __init__(
        self,
        dataset: PromptDataset | None,
        *,
        n_samples_per_prompt: int,
        shuffle: bool = False,
        buffer_filter: BufferFilter = pop_first,
        args: Any = None,
    ):
        self.dataset = dataset
        self.n_samples_per_prompt = n_samples_per_prompt
        self.shuffle_each_epoch = shuffle
        self.buffer_filter = buffer_filter
        self.args = args
        self.state = DataSourceState()
        self.buffer: list[list[Sample]] = []
        if dataset is not None and shuffle:
            dataset.shuffle(0)

    def get_samples(self, num_groups: int) -> list[list[Sample]]:
        groups = self.buffer_filter(self.args, None, self.buffer, num_groups) if self.buffer else []
        while len(groups) < num_groups:
            groups.append(self._next_group())
        return groups

    def _next_group(self) -> list[Sample]:
        state = self.state
        if self.dataset is None:
            record = PromptRecord(prompt="", label=None, metadata={})
        else:
            if state.sample_offset >= len(self.dataset):
                state.epoch_id += 1
                state.sample_offset = 0
                if self.shuffle_each_epoch:
                    self.dataset.shuffle(state.epoch_id)
            record = self.dataset[state.sample_offset]
            state.sample_offset += 1
        group_index = state.sample_group_index
        state.sample_group_index += 1
        group = []
        for _ in range(self.n_samples_per_prompt):
            index = state.sample_index
            state.sample_index += 1
            metadata = copy.deepcopy(record.metadata)
            if record.tools is not None:
                metadata.setdefault("tools", record.tools)
            group.append(
                Sample(
                    uid=f"g{group_index}-s{index}",
                    group_index=group_index,
                    index=index,
                    prompt=copy.deepcopy(record.prompt),
                    label=record.label,
                    metadata=metadata,
                )
            )
        return group

    def add_samples(self, groups: list[list[Sample]]) -> None:
        for group in groups:
            if len(group) != self.n_samples_per_prompt:
                raise ValueError(
                    f"a returned group has {len(group)} samples; --n-samples-per-prompt is {self.n_samples_per_prompt}"
                )
            self.buffer.append(group)

    def get_buffer_length(self) -> int:
        return len(self.buffer)

    def state_dict(self) -> dict[str, Any]:
        return {
            "sample_offset": self.state.sample_offset,
            "epoch_id": self.state.epoch_id,
            "sample_group_index": self.state.sample_group_index,
            "sample_index": self.state.sample_index,
            "metadata": self.state.metadata,
            "buffer": [[s.to_dict() for s in group] for group in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = DataSourceState(
            sample_offset=state["sample_offset"],
            epoch_id=state["epoch_id"],
            sample_group_index=state["sample_group_index"],
            sample_index=state["sample_index"],
            metadata=dict(state.get("metadata", {})),
        )
        self.buffer = [[Sample.from_dict(d) for d in group] for group in state.get("buffer", [])]
        if self.dataset is not None and self.shuffle_each_epoch:
            self.dataset.shuffle(self.state.epoch_id)

    def save(self, directory: str | Path, rollout_id: int) -> Path:
        path = Path(directory) / "rollout" / f"global_dataset_state_dict_{rollout_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state_dict()))
        tmp.replace(path)
        return path

    def load(self, directory: str | Path, rollout_id: int) -> bool:
        path = Path(directory) / "rollout" / f"global_dataset_state_dict_{rollout_id}.json"
        if not path.exists():
            logger.warning("no data-source state at %s; starting from the first prompt", path)
            return False
        self.load_state_dict(json.loads(path.read_text()))
        return True

    def epoch_length(self, rollout_batch_size: int) -> int:
        """Rollouts per epoch, as slime derives ``--num-rollout`` from ``--num-epoch``."""
        if self.dataset is None:
            raise ValueError("--num-epoch needs --prompt-data (the global dataset)")
        return len(self.dataset) // rollout_batch_size
