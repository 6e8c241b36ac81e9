"""Regenerate the Python code for ``protos/slime.proto`` with grpcio-tools, or check that the committed code is current.

``python -m protos.generate`` rewrites ``slime_pb2.py``, ``slime_pb2_grpc.py`` and ``slime_pb2.pyi`` beside the
proto (or into ``--out-dir``); ``--check`` regenerates into a temporary directory and exits 1 with a diff summary
when anything differs from the files in place.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import importlib.resources
import logging
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("protos.generate")

PROTOS_DIR = Path(__file__).resolve().parent
PROTO_NAME = "slime.proto"
GENERATED = ("slime_pb2.py", "slime_pb2_grpc.py", "slime_pb2.pyi")
# protoc is run from the directory above the package with the proto named as ``protos/slime.proto``, so
# the gRPC plugin writes this package-absolute import; a relative layout would give ``import slime_pb2``,
# which only works with protos/ itself on sys.path.
EXPECTED_GRPC_IMPORT = "from protos import slime_pb2 as protos_dot_slime__pb2"
MAX_DIFF_LINES = 40
# The serialized descriptor is one line of several KB; a summary shows its start only.
MAX_DIFF_LINE_CHARS = 160


class GenerationError(RuntimeError):
    """protoc failed or produced code whose shape this script does not expect."""


def _grpc_tools_version() -> str:
    return importlib.metadata.version("grpcio-tools")


def generate(out_dir: Path, protos_dir: Path = PROTOS_DIR) -> list[Path]:
    """Run protoc on ``protos_dir/slime.proto`` and write the three generated files into ``out_dir``."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise GenerationError(
            "grpcio-tools is not installed; install the dev extra (pip install -e '.[dev]')"
        ) from exc

    proto = protos_dir / PROTO_NAME
    if not proto.is_file():
        raise GenerationError(f"proto source not found: {proto}")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slime-protoc-") as scratch:
        # A scratch root holding exactly ``protos/slime.proto`` keeps the generated code independent of
        # where the checkout lives and of what else sits beside the proto.
        root = Path(scratch)
        (root / "protos").mkdir()
        shutil.copyfile(proto, root / "protos" / PROTO_NAME)
        argv = [
            "grpc_tools.protoc",
            f"--proto_path={root}",
            f"--proto_path={well_known}",
            f"--python_out={root}",
            f"--grpc_python_out={root}",
            f"--pyi_out={root}",
            f"protos/{PROTO_NAME}",
        ]
        code = protoc.main(argv)
        if code != 0:
            raise GenerationError(f"protoc exited with {code} on {proto}")
        grpc_module = (root / "protos" / "slime_pb2_grpc.py").read_text()
        if EXPECTED_GRPC_IMPORT not in grpc_module:
            raise GenerationError(
                f"slime_pb2_grpc.py lacks the import {EXPECTED_GRPC_IMPORT!r}; "
                f"grpcio-tools {_grpc_tools_version()} changed its output shape"
            )
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(root / "protos" / name, target)
            written.append(target)
    return written


def _clip(line: str) -> str:
    if len(line) <= MAX_DIFF_LINE_CHARS:
        return line
    return f"{line[:MAX_DIFF_LINE_CHARS]}... ({len(line)} chars)"


def diff_summary(expected_dir: Path, actual_dir: Path) -> list[str]:
    """One entry per generated file that differs between the two directories, with a short unified diff."""
    problems = []
    for name in GENERATED:
        expected, actual = expected_dir / name, actual_dir / name
        if not actual.is_file():
            problems.append(f"{actual}: missing (regeneration would create it)")
            continue
        fresh, committed = expected.read_text().splitlines(), actual.read_text().splitlines()
        if fresh == committed:
            continue
        diff = list(
            difflib.unified_diff(
                committed, fresh, f"{actual} (committed)", f"{name} (regenerated)", lineterm=""
            )
        )
        changed = sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))
        shown = "\n".join(_clip(line) for line in diff[:MAX_DIFF_LINES])
        more = f"\n... {len(diff) - MAX_DIFF_LINES} more diff lines" if len(diff) > MAX_DIFF_LINES else ""
        problems.append(f"{actual}: {changed} changed lines\n{shown}{more}")
    return problems


def check(out_dir: Path, protos_dir: Path = PROTOS_DIR) -> list[str]:
    """Regenerate into a temporary directory and compare with ``out_dir``; returns the differences found."""
    with tempfile.TemporaryDirectory(prefix="slime-protos-check-") as tmp:
        fresh_dir = Path(tmp)
        generate(fresh_dir, protos_dir)
        return diff_summary(fresh_dir, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__)
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=PROTOS_DIR,
        help="where the generated files go (default: beside slime.proto, i.e. the protos package)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and exit 1 if the files in --out-dir differ",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.check:
            problems = check(args.out_dir)
            if problems:
                logger.error(
                    "generated code is out of date with %s (grpcio-tools %s):\n%s\n"
                    "run `python -m protos.generate` and commit the result",
                    PROTOS_DIR / PROTO_NAME,
                    _grpc_tools_version(),
                    "\n".join(problems),
                )
                return 1
            logger.info("generated code in %s is up to date", args.out_dir)
            return 0
        for path in generate(args.out_dir):
            logger.info("wrote %s", path)
        return 0
    except GenerationError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
