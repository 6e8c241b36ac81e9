"""Prompt loading and the data source: slicing, keys, shuffling per epoch, groups, partial buffer, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.core.sample import Sample
from trainer.data import DatasetKeys, PromptDataset, RolloutDataSource, parse_data_path, read_rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    rows = [{"q": f"what is {i}+{i}?", "a": 2 * i, "metadata": json.dumps({"id": i})} for i in range(10)]
    return _write_jsonl(tmp_path / "p.jsonl", rows)


def test_parse_data_path_slices() -> None:
    assert parse_data_path("a/b.jsonl") == ("a/b.jsonl", None, None)
    assert parse_data_path("a/b.jsonl@[2:5]") == ("a/b.jsonl", 2, 5)
    assert parse_data_path("x.parquet@[:3]") == ("x.parquet", None, 3)
    assert parse_data_path("x.parquet@[-2:]") == ("x.parquet", -2, None)


def test_jsonl_and_parquet_read_alike(tmp_path: Path, prompts: Path) -> None:
    rows = read_rows(str(prompts))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "p.parquet")
    assert read_rows(str(tmp_path / "p.parquet@[2:4]")) == rows[2:4]
    assert [r["a"] for r in read_rows(f"{prompts}@[7:]")] == [14, 16, 18]


def test_unknown_format_and_missing_file_are_named(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(ValueError, match=r"\.csv"):
        read_rows(str(tmp_path / "p.csv"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_rows(str(tmp_path / "nope.jsonl"))


def test_keys_labels_as_strings_and_json_metadata(prompts: Path) -> None:
    ds = PromptDataset(str(prompts), keys=DatasetKeys(input_key="q", label_key="a"))
    assert len(ds) == 10
    assert ds[3].prompt == "what is 3+3?"
    assert ds[3].label == "6"
    assert ds[3].metadata == {"id": 3}


def test_missing_input_key_names_the_flag(prompts: Path) -> None:
    with pytest.raises(KeyError, match="--input-key"):
        PromptDataset(str(prompts), keys=DatasetKeys(input_key="question"))


def test_shuffle_is_deterministic_per_epoch(prompts: Path) -> None:
    a = PromptDataset(str(prompts), keys=DatasetKeys(input_key="q"), seed=7)
    b = PromptDataset(str(prompts), keys=DatasetKeys(input_key="q"), seed=7)
    a.shuffle(1)
    b.shuffle(1)
    assert a.order == b.order
    b.shuffle(2)
    assert a.order != b.order
    assert sorted(a.order) == list(range(10))


def test_groups_indices_uids_and_epoch_wrap(prompts: Path) -> None:
    ds = PromptDataset(str(prompts), keys=DatasetKeys(input_key="q", label_key="a"))
    source = RolloutDataSource(ds, n_samples_per_prompt=3)
    groups = source.get_samples(4)
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    assert [g[0].group_index for g in groups] == [0, 1, 2, 3]
    assert [s.index for s in groups[1]] == [3, 4, 5]
    assert len({s.uid for g in groups for s in g}) == 12
    assert all(s.prompt == groups[2][0].prompt for s in groups[2])
    groups[2][0].metadata["touched"] = True
    assert "touched" not in groups[2][1].metadata
    source.get_samples(6)
    assert source.state.epoch_id == 0
    assert source.get_samples(1)[0][0].prompt == "what is 0+0?"
    assert source.state.epoch_id == 1


def test_partial_groups_come_back_first_and_must_be_whole(prompts: Path) -> None:
    ds = PromptDataset(str(prompts), keys=DatasetKeys(input_key="q"))
    source = RolloutDataSource(ds, n_samples_per_prompt=2)
    first = source.get_samples(2)
    source.add_samples([first[1]])
    again = source.get_samples(2)
    assert again[0][0].uid == first[1][0].uid
    assert again[1][0].group_index == 2
    with pytest.raises(ValueError, match="--n-samples-per-prompt"):
        source.add_samples([[Sample()]])


def test_save_and_load_resume_the_same_data(tmp_path: Path, prompts: Path) -> None:
    def fresh() -> RolloutDataSource:
        ds = PromptDataset(str(prompts), keys=DatasetKeys(input_key="q"), seed=3)
        return RolloutDataSource(ds, n_samples_per_prompt=2, shuffle=True)

    source = fresh()
    source.get_samples(7)
    partial = source.get_samples(1)
    source.add_samples(partial)
    source.save(tmp_path / "ckpt", rollout_id=4)
    expected = source.get_samples(6)

    resumed = fresh()
    assert resumed.load(tmp_path / "ckpt", rollout_id=4)
    got = resumed.get_samples(6)
    assert [[s.uid for s in g] for g in got] == [[s.uid for s in g] for g in expected]
    assert [g[0].prompt for g in got] == [g[0].prompt for g in expected]


def test_without_global_dataset_groups_are_empty_samples() -> None:
    source = RolloutDataSource(None, n_samples_per_prompt=2)
    group = source.get_samples(1)[0]
    assert [s.prompt for s in group] == ["", ""]
    with pytest.raises(ValueError, match="--num-epoch"):
        source.epoch_length(4)
