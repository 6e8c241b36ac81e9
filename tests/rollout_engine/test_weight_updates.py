"""Every weight-update path of the built-in engine: after an update the engine answers like a model freshly
loaded from the new weights; a bad update is refused with 400 and the served weights do not change."""

from __future__ import annotations

import base64
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from services.core.net import free_port
from services.core.process_group import init_weight_update_group
from services.core.tiny_model import build_tiny_model
from services.rollout_engine.weight_transport import (
    FlattenedTensorMetadata,
    flatten_bucket,
    serialize,
)

PROMPTS = [[5, 17, 99, 230], [41, 8]]


@pytest.fixture
def updatable(engine, tiny_model_dir: Path):
    """The shared engine, given back with its original weights and version whatever the test did."""
    yield engine
    with engine.client() as client:
        restored = client.post(
            "/update_weights_from_disk", json={"model_path": str(tiny_model_dir), "weight_version": "default"}
        )
    assert restored.status_code == 200, restored.text


@pytest.fixture(scope="module")
def models(reference, other_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return {
        "a": reference,
        "b": AutoModelForCausalLM.from_pretrained(other_model_dir, dtype=torch.float32).eval(),
    }


@pytest.fixture(scope="module")
def weights(tiny_model_dir: Path, other_model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "a": load_file(str(tiny_model_dir / "model.safetensors")),
        "b": load_file(str(other_model_dir / "model.safetensors")),
    }


def _outputs(client: httpx.Client) -> list[dict]:
    """Greedy and seeded-sampling answers for fixed prompts (with log-probs)."""
    out = []
    for prompt in PROMPTS:
        for sampling in ({"temperature": 0}, {"temperature": 1.0, "sampling_seed": 9}):
            body = {
                "input_ids": prompt,
                "sampling_params": {"max_new_tokens": 12, "ignore_eos": True, **sampling},
                "return_logprob": True,
            }
            response = client.post("/generate", json=body)
            assert response.status_code == 200, response.text
            out.append(response.json())
    return out


def _assert_served_by(client: httpx.Client, model, greedy_reference, teacher_forced) -> list[dict]:
    outputs = _outputs(client)
    for i, out in enumerate(outputs):
        prompt = PROMPTS[i // 2]
        if i % 2 == 0:
            assert out["output_ids"] == greedy_reference(model, prompt, 12)
        got = torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])
        expected = teacher_forced(model, prompt, out["output_ids"], 0.0 if i % 2 == 0 else 1.0)
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    return outputs


def _same(a: list[dict], b: list[dict]) -> bool:
    strip = lambda outs: [(o["output_ids"], o["meta_info"]["output_token_logprobs"]) for o in outs]  # noqa: E731
    return strip(a) == strip(b)


def test_update_from_disk(
    updatable, models, other_model_dir, tmp_path, greedy_reference, teacher_forced
) -> None:
    with updatable.client() as client:
        response = client.post(
            "/update_weights_from_disk", json={"model_path": str(other_model_dir), "weight_version": "disk-1"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["success"] is True and response.json()["weight_version"] == "disk-1"
        served = _assert_served_by(client, models["b"], greedy_reference, teacher_forced)
        assert served[0]["meta_info"]["weight_version"] == "disk-1"
        assert client.get("/get_weight_version").json() == {"weight_version": "disk-1"}

        missing = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "nope")})
        assert missing.status_code == 400 and missing.json()["field"] == "model_path"
        wrong = build_tiny_model(tmp_path / "wider", hidden_size=32, num_heads=2, num_kv_heads=1)
        refused = client.post(
            "/update_weights_from_disk", json={"model_path": str(wrong), "weight_version": "x"}
        )
        body = refused.json()
        assert refused.status_code == 400 and body["success"] is False and "wrong shapes" in body["message"]
        assert body["weight_version"] == "disk-1"
        assert _same(_outputs(client), served)


def test_update_from_tensor_flattened_bucket_and_named_list(
    updatable, models, weights, greedy_reference, teacher_forced
) -> None:
    names = sorted(weights["a"])
    half = len(names) // 2
    with updatable.client() as client:
        # Two buckets: one in slime's flattened format, one as SGLang's default list of (name, tensor).
        bucket = flatten_bucket([(n, weights["a"][n]) for n in names[:half]])
        first = client.post(
            "/update_weights_from_tensor",
            json={"serialized_named_tensors": [serialize(bucket)], "load_format": "flattened_bucket"},
        )
        assert first.status_code == 200 and first.json()["success"], first.text
        pairs = [(n, weights["a"][n]) for n in names[half:]]
        second = client.post(
            "/update_weights_from_tensor",
            json={"serialized_named_tensors": [serialize(pairs)], "weight_version": "tensor-2"},
        )
        assert second.status_code == 200 and second.json()["weight_version"] == "tensor-2", second.text
        served = _assert_served_by(client, models["a"], greedy_reference, teacher_forced)

        bad_name = serialize([("model.layers.0.mlp.nonsense.weight", torch.zeros(4))] + pairs[:1])
        bad_shape = serialize([(names[0], torch.zeros(3, 3))])
        for payload, expected in ((bad_name, "unknown parameter names"), (bad_shape, "wrong shapes")):
            response = client.post(
                "/update_weights_from_tensor", json={"serialized_named_tensors": [payload]}
            )
            assert response.status_code == 400 and expected in response.json()["message"], response.text
        # A payload that would run code when unpickled is refused before anything runs.
        evil = base64.b64encode(pickle.dumps(print)).decode()
        response = client.post("/update_weights_from_tensor", json={"serialized_named_tensors": [evil]})
        assert response.status_code == 400 and "not allowed" in response.json()["message"]
        assert client.get("/get_weight_version").json()["weight_version"] == "tensor-2"
        assert _same(_outputs(client), served)


def _join_weight_group(client: httpx.Client, pool: ThreadPoolExecutor, port: int, group_name: str):
    """A two-rank gloo weight-update group: this process is rank 0, the engine joins from its handler."""
    joined = pool.submit(
        client.post,
        "/init_weights_update_group",
        json={
            "master_address": "127.0.0.1",
            "master_port": port,
            "rank_offset": 1,
            "world_size": 2,
            "group_name": group_name,
            "backend": "gloo",
        },
    )
    group = init_weight_update_group(
        master_address="127.0.0.1",
        master_port=port,
        rank=0,
        world_size=2,
        group_name=group_name,
        backend="gloo",
        timeout_s=60,
    )
    assert joined.result().json()["success"] is True
    return group


def test_update_from_distributed_broadcast(
    updatable, models, weights, greedy_reference, teacher_forced
) -> None:
    port = free_port()
    group_name = "test-weights"
    with updatable.client(timeout=120) as client, ThreadPoolExecutor(max_workers=1) as pool:
        group = _join_weight_group(client, pool, port, group_name)
        try:

            def push(
                named: list[tuple[str, torch.Tensor]], shapes: list[list[int]], version: str
            ) -> httpx.Response:
                answer = pool.submit(
                    client.post,
                    "/update_weights_from_distributed",
                    json={
                        "names": [n for n, _ in named],
                        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
                        "shapes": shapes,
                        "group_name": group_name,
                        "weight_version": version,
                    },
                )
                for _, tensor in named:
                    dist.broadcast(tensor.contiguous(), src=0, group=group)
                return answer.result()

            named = sorted(weights["b"].items())
            response = push(named, [list(t.shape) for _, t in named], "dist-3")
            assert response.status_code == 200 and response.json()["success"], response.text
            served = _assert_served_by(client, models["b"], greedy_reference, teacher_forced)
            assert served[0]["meta_info"]["weight_version"] == "dist-3"

            # A declared shape that does not fit: the broadcasts are still drained, then the update is refused.
            wrong = [list(t.shape) for _, t in named[:2]]
            wrong[1] = [wrong[1][0] + 1, *wrong[1][1:]]
            bad = [(n, torch.zeros(s)) for (n, _), s in zip(named[:2], wrong, strict=True)]
            refused = push(bad, wrong, "dist-bad")
            assert refused.status_code == 400 and "wrong shapes" in refused.json()["message"]
            assert client.get("/get_weight_version").json()["weight_version"] == "dist-3"
            assert _same(_outputs(client), served)
            # The group is still in step: a good update afterwards works.
            again = push(named[:3], [list(t.shape) for _, t in named[:3]], "dist-4")
            assert again.status_code == 200 and again.json()["weight_version"] == "dist-4"
        finally:
            assert client.post("/destroy_weights_update_group", json={"group_name": group_name}).json()[
                "success"
            ]
            dist.destroy_process_group(group)
        unknown = client.post(
            "/update_weights_from_distributed",
            json={"names": ["x"], "dtypes": ["float32"], "shapes": [[1]], "group_name": group_name},
        )
        assert unknown.status_code == 400 and unknown.json()["field"] == "group_name"


def _with_bf16(weights: dict[str, torch.Tensor], model_dir: Path, out: Path) -> tuple[dict, Path]:
    """``weights`` with every MLP tensor in bfloat16 (what a sender pushes) and a copy of ``model_dir`` holding the
    same values in float32 (what the engine must then serve, loaded from disk as a reference)."""
    sent = {n: t.to(torch.bfloat16) if ".mlp." in n else t for n, t in weights.items()}
    reference = shutil.copytree(model_dir, out)
    save_file({n: t.float().contiguous() for n, t in sent.items()}, str(reference / "model.safetensors"))
    return sent, reference


def _flushed_outputs(client: httpx.Client) -> list[dict]:
    """``_outputs`` from an empty KV cache (as after a weight sync): the answers depend on the weights alone."""
    assert client.get("/flush_cache").status_code == 200
    return _outputs(client)


def _reference_outputs(client: httpx.Client, reference: Path) -> list[dict]:
    loaded = client.post("/update_weights_from_disk", json={"model_path": str(reference)})
    assert loaded.status_code == 200, loaded.text
    return _flushed_outputs(client)


def _byte_bucket(named: list[tuple[str, torch.Tensor]]) -> dict:
    """SGLang's current ``flattened_bucket``: one uint8 tensor of every tensor's bytes, indices in bytes."""
    flat = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in named])
    metadata, offset = [], 0
    for name, tensor in named:
        size = tensor.numel() * tensor.element_size()
        metadata.append(
            FlattenedTensorMetadata(name, tensor.shape, tensor.dtype, offset, offset + size, size)
        )
        offset += size
    return {"flattened_tensor": flat, "metadata": metadata}


def test_update_from_tensor_byte_bucket_of_mixed_dtypes(
    updatable, weights, other_model_dir, tmp_path
) -> None:
    sent, reference = _with_bf16(weights["b"], other_model_dir, tmp_path / "reference")
    with updatable.client() as client:
        response = client.post(
            "/update_weights_from_tensor",
            json={
                "serialized_named_tensors": [serialize(_byte_bucket(sorted(sent.items())))],
                "load_format": "flattened_bucket",
            },
        )
        assert response.status_code == 200 and response.json()["success"], response.text
        pushed = _flushed_outputs(client)
        assert _same(pushed, _reference_outputs(client, reference))


def test_update_from_distributed_flattened_buckets(updatable, weights, other_model_dir, tmp_path) -> None:
    sent, reference = _with_bf16(weights["b"], other_model_dir, tmp_path / "reference")
    named = sorted(sent.items())
    # Three requests, each one broadcast; MLP (bf16) and attention/norm (fp32) tensors share buckets.
    buckets = [named[i::3] for i in range(3)]
    assert all(len({t.dtype for _, t in bucket}) == 2 for bucket in buckets)
    port = free_port()
    group_name = "test-flattened"
    with updatable.client(timeout=120) as client, ThreadPoolExecutor(max_workers=1) as pool:
        info = client.get("/get_server_info").json()
        assert info["weight_update_load_formats"] == ["flattened_bucket"]
        group = _join_weight_group(client, pool, port, group_name)

        def request(bucket: list[tuple[str, torch.Tensor]], version: str, load_format: str) -> dict:
            return {
                "names": [n for n, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket],
                "group_name": group_name,
                "weight_version": version,
                "load_format": load_format,
            }

        def push(bucket: list[tuple[str, torch.Tensor]], version: str) -> httpx.Response:
            answer = pool.submit(
                client.post,
                "/update_weights_from_distributed",
                json=request(bucket, version, "flattened_bucket"),
            )
            dist.broadcast(_byte_bucket(bucket)["flattened_tensor"], src=0, group=group)
            return answer.result()

        try:
            for i, bucket in enumerate(buckets):
                response = push(bucket, f"flat-{i}")
                assert response.status_code == 200 and response.json()["success"], response.text
            assert client.get("/get_weight_version").json()["weight_version"] == "flat-2"

            # Shapes the model does not have: the bucket is still received whole, then the update is refused.
            bad = [(n, torch.zeros(t.shape[0] + 1, *t.shape[1:], dtype=t.dtype)) for n, t in buckets[0][:2]]
            refused = push(bad, "flat-bad")
            assert refused.status_code == 400 and "wrong shapes" in refused.json()["message"], refused.text
            # An unknown load format is refused before any broadcast is expected.
            refused = client.post(
                "/update_weights_from_distributed", json=request(buckets[0], "bad", "safetensors")
            )
            body = refused.json()
            assert refused.status_code == 400 and body["field"] == "load_format", refused.text
            assert "flattened_bucket" in body["message"] and body["weight_version"] == "flat-2"
            # The group is still in step: the same weights again are taken.
            again = push(buckets[0], "flat-3")
            assert again.status_code == 200 and again.json()["weight_version"] == "flat-3", again.text
            pushed = _flushed_outputs(client)
        finally:
            assert client.post("/destroy_weights_update_group", json={"group_name": group_name}).json()[
                "success"
            ]
            dist.destroy_process_group(group)
        assert _same(pushed, _reference_outputs(client, reference))
