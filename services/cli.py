"""The `slime` command line: print the validated arguments, run one service, train, or run the embedded demo.

Each command's module is imported only once that command is chosen, so `slime --help` and `slime args` never
load torch, transformers or a service."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

# `slime serve NAME` -> module whose `main(argv: list[str]) -> int` runs that service.
SERVICES: dict[str, str] = {
    "rollout-engine": "services.rollout_engine.server",
    "router": "router.server",
    "reward-model": "services.reward_model.server",
    "rollout-buffer": "rollout_buffer.server",
}

# `slime train` / `slime train-async` -> the `mode` passed to `trainer.driver.main(argv, mode)`.
TRAIN_MODES: dict[str, str] = {"train": "sync", "train-async": "async"}
TRAIN_MODULE = "trainer.driver"
DEMO_MODULE = "trainer.demo"
CONVERT_MODULE = "trainer.backends.megatron_backend.convert_cli"

_OUTPUT_FORMAT_DEST = "slime_args_output_format"


def _cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slime",
        description="slime RL post-training (GRPO, GSPO, PPO, REINFORCE++) as services.",
        epilog="Run `slime COMMAND --help` for a command's own flags.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("args", help="print the parsed and validated arguments (--format json|text)")
    commands.add_parser("serve", help=f"run one service: {', '.join(SERVICES)}")
    commands.add_parser("train", help="synchronous training driver (slime's train.py)")
    commands.add_parser(
        "train-async", help="one-step-off asynchronous training driver (slime's train_async.py)"
    )
    commands.add_parser("demo", help="the embedded quick start: every service on this machine")
    commands.add_parser("convert", help="checkpoints: hf-to-megatron, megatron-to-hf")
    return parser


def _fail(message: str, status: int = 1) -> NoReturn:
    sys.stderr.write(f"slime: error: {message}\n")
    raise SystemExit(status)


def _load_entry_point(module_name: str, function: str, what: str) -> Callable[..., Any]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            _fail(f"{what} is not available: its module {module_name} was not found")
        _fail(f"{what} cannot start: it needs the Python package {missing!r}, which is not installed")
    entry = getattr(module, function, None)
    if not callable(entry):
        _fail(f"{what} is not available: {module_name} has no {function}()")
    return entry


def _add_output_format(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument_group("Output").add_argument(
        "--format",
        dest=_OUTPUT_FORMAT_DEST,
        choices=["json", "text"],
        default="json",
        help="json: one object keyed by dest, sorted; text: one `dest = value` line each.",
    )
    return parser


def _run_args(argv: Sequence[str]) -> int:
    from services.core.arguments import parse_args
    from services.core.logging_setup import setup_logging

    # stdout carries the result; only warnings (e.g. ignored --custom-config-path keys) reach stderr.
    setup_logging("WARNING", service="cli")
    namespace = vars(parse_args(argv, add_custom_arguments=_add_output_format, prog="slime args"))
    output_format = namespace.pop(_OUTPUT_FORMAT_DEST)
    if output_format == "json":
        sys.stdout.write(json.dumps(namespace, sort_keys=True, default=str, indent=2) + "\n")
    else:
        for key in sorted(namespace):
            sys.stdout.write(f"{key} = {json.dumps(namespace[key], default=str)}\n")
    return 0


def _run_serve(argv: Sequence[str]) -> int:
    usage = f"usage: slime serve {{{','.join(SERVICES)}}} [FLAGS ...]\n"
    if not argv:
        sys.stderr.write(usage)
        _fail("a service name is required", status=2)
    if argv[0] in ("-h", "--help"):
        sys.stdout.write(usage)
        return 0
    service, rest = argv[0], list(argv[1:])
    if service not in SERVICES:
        _fail(f"unknown service {service!r}; choose from {', '.join(SERVICES)}", status=2)
    main = _load_entry_point(SERVICES[service], "main", f"the {service} service")
    return int(main(rest) or 0)


def _run_train(command: str, argv: Sequence[str]) -> int:
    main = _load_entry_point(TRAIN_MODULE, "main", f"`slime {command}`")
    return int(main(list(argv), TRAIN_MODES[command]) or 0)


def _run_demo(argv: Sequence[str]) -> int:
    main = _load_entry_point(DEMO_MODULE, "main", "`slime demo`")
    return int(main(list(argv)) or 0)


def _run_convert(argv: Sequence[str]) -> int:
    main = _load_entry_point(CONVERT_MODULE, "main", "`slime convert`")
    return int(main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `slime` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _cli_parser()
    if not argv:
        parser.print_usage(sys.stderr)
        _fail("a COMMAND is required: args, serve, train, train-async, demo or convert", status=2)
    if argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command == "args":
        return _run_args(rest)
    if command == "serve":
        return _run_serve(rest)
    if command in TRAIN_MODES:
        return _run_train(command, rest)
    if command == "demo":
        return _run_demo(rest)
    if command == "convert":
        return _run_convert(rest)
    parser.print_usage(sys.stderr)
    _fail(
        f"unknown command {command!r}; choose from args, serve, train, train-async, demo, convert", status=2
    )


if __name__ == "__main__":
    sys.exit(main())
