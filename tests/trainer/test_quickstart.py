"""The quick-start task: its generator and the reward model's ``math`` grader agree on every answer, the held-out
split never leaks, and the warm-start data is as noisy as asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.reward_model.graders import grade
from trainer.quickstart.task import (
    QUICKSTART,
    Problem,
    TaskSpec,
    all_problems,
    boxed,
    prompt_rows,
    sft_rows,
    split_problems,
    write_rows,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "quickstart"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grader_accepts_every_generated_answer_and_rejects_near_misses() -> None:
    problems = all_problems(QUICKSTART.max_operand, "+-")
    assert len(problems) == 2 * 100 * 100
    rows = prompt_rows(problems)
    for row, problem in zip(rows, problems, strict=True):
        assert grade("math", problem.completion, row["label"]) == 1, problem
    # A wrong answer takes the grader's sympy path (about 2 ms each), so near misses are checked on a sample.
    for row, problem in list(zip(rows, problems, strict=True))[::40]:
        assert grade("math", boxed(problem.answer + 1), row["label"]) == 0, problem
        assert grade("math", boxed(problem.answer - 1), row["label"]) == 0, problem


def test_problems_compute_their_answers() -> None:
    assert Problem(47, 38, "+").answer == 85
    assert Problem(3, 9, "-").answer == -6
    assert Problem(3, 9, "-").prompt == "3-9="
    assert Problem(47, 38, "+").completion == "\\boxed{85}"


def test_split_holds_out_disjoint_problems_deterministically() -> None:
    train, held_out = split_problems(20, eval_size=50, seed=3)
    assert len(held_out) == 50
    assert len(train) + len(held_out) == 2 * 21 * 21
    assert not set(train) & set(held_out)
    assert split_problems(20, eval_size=50, seed=3) == (train, held_out)
    assert split_problems(20, eval_size=50, seed=4)[1] != held_out


def test_sft_rows_mix_exact_answers_and_near_misses() -> None:
    train, _ = QUICKSTART.split()
    problems = train[:1000]
    rows = sft_rows(problems, exact_fraction=0.3, offsets=(-1, 1), copies=4, seed=0)
    assert len(rows) == 4000
    exact = 0
    for row, problem in zip(rows, [p for p in problems for _ in range(4)], strict=True):
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": problem.prompt}
        assert assistant["role"] == "assistant"
        assert row["label"] == str(problem.answer)
        score = grade("math", assistant["content"], row["label"])
        if score == 1:
            exact += 1
        else:
            assert (
                grade("math", assistant["content"], str(problem.answer + 1))
                + grade("math", assistant["content"], str(problem.answer - 1))
                == 1
            )
    assert 0.27 < exact / len(rows) < 0.33
    assert sft_rows(problems, exact_fraction=0.3, offsets=(-1, 1), copies=4, seed=0) == rows
    assert sft_rows(problems, exact_fraction=0.3, offsets=(-1, 1), copies=4, seed=1) != rows


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_operand": 0}, "max_operand"),
        ({"max_operand": 9, "ops": "*"}, "ops"),
        ({"max_operand": 9, "eval_size": 200}, "eval_size"),
    ],
)
def test_task_spec_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskSpec(**kwargs)


def test_sft_rows_reject_bad_noise() -> None:
    with pytest.raises(ValueError, match="exact_fraction"):
        sft_rows([Problem(1, 2, "+")], exact_fraction=1.5)
    with pytest.raises(ValueError, match="offsets"):
        sft_rows([Problem(1, 2, "+")], exact_fraction=0.5, offsets=(0, 1))
    with pytest.raises(ValueError, match="copies"):
        sft_rows([Problem(1, 2, "+")], exact_fraction=0.5, copies=0)


def test_written_rows_round_trip(tmp_path: Path) -> None:
    problems = [Problem(1, 2, "+"), Problem(5, 7, "-")]
    path = write_rows(prompt_rows(problems), tmp_path / "sub" / "data.jsonl")
    assert _read(path) == [{"prompt": "1+2=", "label": "3"}, {"prompt": "5-7=", "label": "-2"}]


def test_committed_data_is_the_quickstart_split_and_grades_correctly() -> None:
    train, held_out = QUICKSTART.split()
    train_rows, eval_rows = _read(EXAMPLES / "train.jsonl"), _read(EXAMPLES / "eval.jsonl")
    assert train_rows == prompt_rows(train)
    assert eval_rows == prompt_rows(held_out)
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}


def test_truncated_answers_score_zero_and_rewards_are_group_normalised() -> None:
    from services.core.arguments import parse_args
    from services.core.sample import Sample
    from trainer.demo import demo_flags
    from trainer.quickstart.reward import truncated_answers_score_zero

    args = parse_args([*demo_flags(), "--n-samples-per-prompt", "4"])
    statuses = [
        Sample.Status.COMPLETED,
        Sample.Status.TRUNCATED,
        Sample.Status.COMPLETED,
        Sample.Status.COMPLETED,
    ]
    samples = [
        Sample(prompt="1+1=", label="2", reward=reward, status=status)
        for reward, status in zip([1.0, 1.0, 0.0, 1.0], statuses, strict=True)
    ]
    raw, rewards = truncated_answers_score_zero(args, samples)
    assert raw == [1.0, 0.0, 0.0, 1.0]  # the truncated answer's correct box does not count
    assert sum(rewards) == pytest.approx(0.0) and rewards[0] > 0 > rewards[1] == rewards[2]
