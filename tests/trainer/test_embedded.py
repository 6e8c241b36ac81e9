"""How the embedded stack starts its engines and router: the engines share the cores and are seeded apart, and the
router balances their load, as slime starts its own. (The whole stack runs in the driver end-to-end tests.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.arguments import parse_args
from trainer.embedded import EmbeddedStack, default_engine_threads


def _stack(tmp_path: Path, *, engine_threads: int | None) -> EmbeddedStack:
    args = parse_args(
        [
            "--hf-checkpoint",
            "unused-model",
            "--rollout-batch-size",
            "2",
            "--num-rollout",
            "1",
            "--run-id",
            "embedded-test",
        ]
    )
    return EmbeddedStack(args, tmp_path, num_engines=2, engine_threads=engine_threads)


@pytest.mark.parametrize(
    ("cores", "engines", "trainer_threads", "expected"),
    [
        pytest.param(2, 2, 0, 1, id="two-cores-two-engines"),
        pytest.param(16, 2, 0, 8, id="sync-trainer-waits"),
        pytest.param(16, 2, 4, 6, id="async-trainer-keeps-its-cores"),
        pytest.param(2, 2, 1, 1, id="never-below-one"),
        pytest.param(1, 2, 4, 1, id="fewer-cores-than-the-trainer"),
    ],
)
def test_engines_split_the_cores_left_to_them(cores, engines, trainer_threads, expected):
    assert default_engine_threads(engines, trainer_threads, cores=cores) == expected


def test_an_engine_gets_its_threads_as_a_flag_and_in_its_environment(tmp_path):
    engine = _stack(tmp_path, engine_threads=3).engine_process(0, 4321)
    assert engine.argv[engine.argv.index("--num-threads") + 1] == "3"
    assert engine.env["OMP_NUM_THREADS"] == "3"
    assert "--num-threads" not in _stack(tmp_path, engine_threads=None).engine_process(0, 4321).argv


def test_each_engine_samples_with_its_own_seed_as_in_slime(tmp_path):
    stack = _stack(tmp_path, engine_threads=1)
    seeds = [
        int(argv[argv.index("--rollout-seed") + 1])
        for argv in (stack.engine_process(i, 4321 + i).argv for i in range(2))
    ]
    assert seeds == [stack.args.seed, stack.args.seed + 1]


def test_the_router_balances_the_engines_as_slimes_router_does(tmp_path):
    router = _stack(tmp_path, engine_threads=1).router_process(
        4322, ["http://127.0.0.1:1", "http://127.0.0.1:2"], ["--run-id", "embedded-test"]
    )
    assert router.argv[router.argv.index("--balance-abs-threshold") + 1] == "0"
    assert router.argv[router.argv.index("--worker-urls") + 1 : router.argv.index("--worker-urls") + 3] == [
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
    ]
