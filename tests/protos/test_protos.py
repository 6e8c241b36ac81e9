"""The proto contract (messages, fields, services) and the generated code: importable as a package and kept in
step with slime.proto by ``python -m protos.generate --check``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protos import generate, slime_pb2, slime_pb2_grpc

REPO = Path(__file__).resolve().parents[2]

CONTRACT_FIELDS = {
    "Sample": {
        "uid",
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
        "has_label",
        "has_reward",
        "has_loss_mask",
        "has_rollout_log_probs",
    },
    "RewardItem": {"uid", "prompt", "response", "label", "metadata"},
    "ScoreRequest": {"items", "rm_type", "reward_key"},
    "RewardValue": {"value", "fields", "is_dict", "error"},
    "ScoreResponse": {"rewards"},
    "FetchRequest": {"run_id", "max_groups", "min_groups", "lease_seconds", "wait_seconds"},
    "Group": {"group_id", "lease_id", "samples"},
    "AckRequest": {"run_id", "lease_ids"},
    "AckResponse": {"acked"},
    "StatusRequest": {"run_id"},
    "TrainerStatus": {"run_id", "rollout_id", "weight_version", "state", "reward_mean"},
}

# (request, response, server-streaming) per method.
CONTRACT_SERVICES = {
    "RewardService": {
        "Score": ("ScoreRequest", "ScoreResponse", False),
        "ScoreGroup": ("ScoreRequest", "ScoreResponse", False),
    },
    "BufferService": {
        "FetchGroups": ("FetchRequest", "Group", True),
        "Ack": ("AckRequest", "AckResponse", False),
    },
    "TrainerService": {"GetStatus": ("StatusRequest", "TrainerStatus", False)},
}


def test_package_and_messages_match_the_contract() -> None:
    assert slime_pb2.DESCRIPTOR.package == "slime.v1"
    assert set(slime_pb2.DESCRIPTOR.message_types_by_name) == set(CONTRACT_FIELDS)
    for name, fields in CONTRACT_FIELDS.items():
        descriptor = slime_pb2.DESCRIPTOR.message_types_by_name[name]
        assert {f.name for f in descriptor.fields} == fields, name
        numbers = [f.number for f in descriptor.fields]
        assert len(numbers) == len(set(numbers)), name


def test_sample_field_types_and_presence() -> None:
    fields = slime_pb2.Sample.DESCRIPTOR.fields_by_name
    assert fields["prompt"].message_type.full_name == "google.protobuf.Value"
    assert fields["reward"].message_type.full_name == "google.protobuf.Value"
    assert fields["metadata"].message_type.full_name == "google.protobuf.Struct"
    assert fields["rollout_log_probs"].type == fields["rollout_log_probs"].TYPE_DOUBLE
    assert fields["group_index"].has_presence and fields["index"].has_presence
    msg = slime_pb2.Sample(group_index=0)
    assert msg.HasField("group_index") and not msg.HasField("index")


def test_services_match_the_contract() -> None:
    assert set(slime_pb2.DESCRIPTOR.services_by_name) == set(CONTRACT_SERVICES)
    for service_name, methods in CONTRACT_SERVICES.items():
        service = slime_pb2.DESCRIPTOR.services_by_name[service_name]
        assert service.full_name == f"slime.v1.{service_name}"
        found = {
            m.name: (m.input_type.name, m.output_type.name, m.server_streaming)
            for m in service.methods
            if not m.client_streaming
        }
        assert found == methods
        assert hasattr(slime_pb2_grpc, f"{service_name}Stub")
        assert hasattr(slime_pb2_grpc, f"add_{service_name}Servicer_to_server")


def test_generated_grpc_module_imports_the_package_module() -> None:
    source = (REPO / "protos" / "slime_pb2_grpc.py").read_text()
    assert generate.EXPECTED_GRPC_IMPORT in source
    assert "\nimport slime_pb2" not in source


def run_generate(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # ``python -m`` puts cwd first on sys.path, so a copied tree runs its own protos package.
    return subprocess.run(
        [sys.executable, "-m", "protos.generate", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_check_passes_on_the_committed_files() -> None:
    result = run_generate(REPO, "--check")
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stderr


@pytest.fixture
def protos_copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_check_fails_after_a_proto_change_until_regenerated(protos_copy: Path) -> None:
    proto = protos_copy / "protos" / "slime.proto"
    proto.write_text(
        proto.read_text().replace("  int32 acked = 1;", "  int32 acked = 1;\n  string note = 2;")
    )

    failed = run_generate(protos_copy, "--check")
    assert failed.returncode == 1
    assert str(protos_copy / "protos" / "slime.proto") in failed.stderr
    assert "slime_pb2.py: " in failed.stderr and "slime_pb2.pyi: " in failed.stderr
    assert "slime_pb2_grpc.py" not in failed.stderr, "the service definitions did not change"

    assert run_generate(protos_copy).returncode == 0
    assert run_generate(protos_copy, "--check").returncode == 0
    assert "note" in (protos_copy / "protos" / "slime_pb2.pyi").read_text()


def test_check_fails_when_generated_code_is_edited_by_hand(protos_copy: Path) -> None:
    grpc_module = protos_copy / "protos" / "slime_pb2_grpc.py"
    grpc_module.write_text(grpc_module.read_text().replace("import warnings\n", ""))
    failed = run_generate(protos_copy, "--check")
    assert failed.returncode == 1
    assert "slime_pb2_grpc.py: 1 changed lines" in failed.stderr
    assert "+import warnings" in failed.stderr


def test_generate_into_another_directory_reproduces_the_committed_files(tmp_path: Path) -> None:
    written = generate.generate(tmp_path / "out")
    assert [p.name for p in written] == list(generate.GENERATED)
    assert generate.diff_summary(tmp_path / "out", REPO / "protos") == []
