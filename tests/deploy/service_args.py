"""Parse a deployment's container command lines with the services' own parsers, so a misspelt or removed flag in
docker-compose.yml or the Helm chart fails here rather than in a crash-looping container."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Sequence

from rollout_buffer.arguments import parse_args as parse_buffer_args
from router.server import build_parser as build_router_parser
from services.core.arguments import parse_args as parse_slime_args
from services.core.arguments import parse_with_passthrough
from services.reward_model.server import parse_args as parse_reward_args
from services.rollout_engine.server import build_parser as build_engine_parser


class BadCommandLine(AssertionError):
    """The service's parser refused the command line; the message is its error."""


def _serve(service: str, argv: list[str]) -> argparse.Namespace:
    if service == "router":
        return build_router_parser().parse_args(argv)
    if service == "rollout-engine":
        # Not the engine's parse_args: it also checks that --hf-checkpoint exists, and the model lives in the image.
        return parse_with_passthrough(build_engine_parser(), argv, sglang=True, megatron=False)
    if service == "reward-model":
        return parse_reward_args(argv)
    if service == "rollout-buffer":
        return parse_buffer_args(argv)
    raise BadCommandLine(f"unknown service {service!r}")


def parse_command(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``slime <argv>`` (``serve SERVICE ...``, ``train ...`` or ``train-async ...``) like the CLI would."""
    argv = list(argv)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            if argv[0] == "serve":
                return _serve(argv[1], argv[2:])
            if argv[0] in ("train", "train-async"):
                return parse_slime_args(argv[1:], prog=f"slime {argv[0]}")
    except SystemExit as exc:
        raise BadCommandLine(f"slime {' '.join(argv)}\n{stderr.getvalue()}") from exc
    raise BadCommandLine(f"not a slime command: {argv}")
