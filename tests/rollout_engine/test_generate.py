"""The built-in engine's SGLang /generate against a Hugging Face reference, on a real server process."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch


def _generate(client: httpx.Client, **body) -> dict:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_output_equals_transformers_generate(engine, reference, tokenizer, greedy_reference) -> None:
    with engine.client() as client:
        for text in ["What is 12 + 35?", "The quick brown fox", "Hello"]:
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            out = _generate(
                client,
                input_ids=prompt,
                sampling_params={"max_new_tokens": 24, "temperature": 0, "ignore_eos": True},
            )
            assert out["output_ids"] == greedy_reference(reference, prompt, 24)
            assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 24}
            assert out["meta_info"]["prompt_tokens"] == len(prompt)
            assert out["meta_info"]["weight_version"] == "default"
        # Text in: tokenized by the engine as SGLang does.
        by_text = _generate(client, text="Hello", sampling_params={"max_new_tokens": 5, "temperature": 0})
        by_ids = _generate(
            client,
            input_ids=tokenizer("Hello")["input_ids"],
            sampling_params={"max_new_tokens": 5, "temperature": 0},
        )
        assert by_text["output_ids"] == by_ids["output_ids"]
        assert by_text["text"] == tokenizer.decode(by_text["output_ids"])


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_p": 0.9},
        {"temperature": 1.3, "top_k": 20},
        {"temperature": 0.0},
    ],
)
def test_logprobs_equal_a_teacher_forced_forward(engine, reference, teacher_forced, sampling) -> None:
    prompt = [5, 17, 99, 230, 8, 41]
    with engine.client() as client:
        out = _generate(
            client,
            input_ids=prompt,
            sampling_params={"max_new_tokens": 40, "ignore_eos": True, "sampling_seed": 3, **sampling},
            return_logprob=True,
        )
    entries = out["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in entries] == out["output_ids"]
    expected = teacher_forced(reference, prompt, out["output_ids"], sampling["temperature"])
    got = torch.tensor([e[0] for e in entries])
    # Log-probs of the full temperature-scaled distribution (top-p / top-k only restrict what is sampled).
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    if "top_k" in sampling:
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + out["output_ids"]])).logits[0, len(prompt) - 1 : -1]
        ranks = (logits > logits.gather(1, torch.tensor(out["output_ids"]).unsqueeze(1))).sum(dim=1)
        assert int(ranks.max()) < sampling["top_k"]


def test_long_chunked_prompt_and_a_group_of_identical_prompts(engine, reference, teacher_forced) -> None:
    long_prompt = [(7 * i) % 400 + 3 for i in range(300)]  # five prefill chunks of 64 tokens
    jobs = [(long_prompt, 0)] + [([9, 8, 7, 6, 5], seed) for seed in range(8)]

    def run(job: tuple) -> dict:
        prompt, seed = job
        with engine.client() as client:
            return _generate(
                client,
                input_ids=prompt,
                sampling_params={"max_new_tokens": 16, "ignore_eos": True, "sampling_seed": seed},
                return_logprob=True,
                logprob_start_len=0,
            )

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        outs = list(pool.map(run, jobs))
    for (prompt, _), out in zip(jobs, outs, strict=True):
        got = torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])
        assert torch.allclose(got, teacher_forced(reference, prompt, out["output_ids"], 1.0), atol=1e-4)
    inputs = outs[0]["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in inputs] == long_prompt
    with torch.no_grad():
        logits = reference(torch.tensor([long_prompt])).logits[0, :-1]
    expected = (
        torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(long_prompt[1:]).unsqueeze(1)).squeeze(1)
    )
    assert torch.allclose(torch.tensor([e[0] for e in inputs[1:]]), expected, atol=1e-4)
    assert len({tuple(o["output_ids"]) for o in outs[1:]}) > 1  # the copies sampled with their own seeds


def test_identical_prompts_arriving_together_are_prefilled_once(engine, reference, teacher_forced) -> None:
    """A group's samples (one batch request of eight copies of a prompt): the prompt is computed once and its
    keys/values copied (``cached_tokens``), and every sample is what it would be alone with its seed."""
    prompt = [(5 * i) % 300 + 4 for i in range(40)]
    seeds = list(range(100, 108))
    params = [{"max_new_tokens": 12, "ignore_eos": True, "sampling_seed": seed} for seed in seeds]
    with engine.client() as client:
        group = client.post(
            "/generate",
            json={"input_ids": [prompt] * len(seeds), "sampling_params": params, "return_logprob": True},
        ).json()
        alone = [
            _generate(client, input_ids=prompt, sampling_params=p, return_logprob=True) for p in params[:3]
        ]
    cached = sorted(out["meta_info"]["cached_tokens"] for out in group)
    assert cached == [0] + [len(prompt)] * (len(seeds) - 1)
    assert all(out["meta_info"]["cached_tokens"] == 0 for out in alone)
    for out, single in zip(group, alone, strict=False):
        assert out["output_ids"] == single["output_ids"]
        got = [e[0] for e in out["meta_info"]["output_token_logprobs"]]
        want = [e[0] for e in single["meta_info"]["output_token_logprobs"]]
        assert got == pytest.approx(want, abs=1e-5)
    for out in group:
        got = torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])
        assert torch.allclose(got, teacher_forced(reference, prompt, out["output_ids"], 1.0), atol=1e-4)
    assert len({tuple(out["output_ids"]) for out in group}) > 1


def test_same_seed_same_output_other_seed_other_output(engine) -> None:
    body = {"input_ids": [7, 8, 9], "return_logprob": True}
    with engine.client() as client:
        runs = [
            _generate(
                client, **body, sampling_params={"max_new_tokens": 32, "ignore_eos": True, "sampling_seed": s}
            )
            for s in (11, 11, 12)
        ]
    assert runs[0]["output_ids"] == runs[1]["output_ids"]
    assert runs[0]["meta_info"]["output_token_logprobs"] == runs[1]["meta_info"]["output_token_logprobs"]
    assert runs[0]["output_ids"] != runs[2]["output_ids"]


def test_hundred_concurrent_mixed_length_requests_all_correct(engine, reference) -> None:
    rng = random.Random(0)
    jobs = []
    for i in range(100):
        prompt = [rng.randint(3, 450) for _ in range(rng.randint(1, 40))]
        jobs.append((f"mix-{i}", prompt, rng.randint(1, 48), rng.choice([0.0, 0.8, 1.0])))

    def run(client: httpx.Client, job: tuple) -> httpx.Response:
        rid, prompt, n, temperature = job
        body = {
            "rid": rid,
            "input_ids": prompt,
            "sampling_params": {"max_new_tokens": n, "temperature": temperature, "ignore_eos": True},
            "return_logprob": True,
        }
        return client.post("/generate", json=body)

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    with (
        ThreadPoolExecutor(max_workers=100) as pool,
        httpx.Client(base_url=engine.url, timeout=120, limits=limits) as client,
    ):
        responses = list(pool.map(lambda job: run(client, job), jobs))
    for (rid, prompt, n, temperature), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["meta_info"]["id"] == rid
        assert len(out["output_ids"]) == n
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + out["output_ids"]])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
        expected = expected.gather(1, torch.tensor(out["output_ids"]).unsqueeze(1)).squeeze(1)
        got = torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])
        assert torch.allclose(got, expected, atol=1e-4), (rid, (got - expected).abs().max())
        if temperature == 0:
            assert logits.argmax(dim=-1).tolist() == out["output_ids"], rid


def _running_requests(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("slime_rollout_engine_num_running_reqs"):
            return float(line.split()[-1])
    raise AssertionError("the engine's /metrics has no slime_rollout_engine_num_running_reqs")


def test_long_generation_does_not_hold_back_short_ones(engine) -> None:
    """Short requests sent while a long generation runs finish long before it would have let them (continuous
    batching), not after it."""
    long_seconds: list[float] = []

    def long_request() -> None:
        start = time.perf_counter()
        with engine.client() as client:
            _generate(client, input_ids=[4, 5], sampling_params={"max_new_tokens": 480, "ignore_eos": True})
        long_seconds.append(time.perf_counter() - start)

    worker = threading.Thread(target=long_request)
    with engine.client() as client:
        worker.start()
        deadline = time.monotonic() + 10
        while _running_requests(client) < 1 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.002)
        assert worker.is_alive(), "the long generation ended before the short requests could be sent"
        latencies = []
        for _ in range(5):
            start = time.perf_counter()
            out = _generate(
                client, input_ids=[6, 7, 8], sampling_params={"max_new_tokens": 3, "ignore_eos": True}
            )
            latencies.append(time.perf_counter() - start)
            assert len(out["output_ids"]) == 3
    worker.join()
    # Waiting for the long generation would have cost a short request most of its 480 decode steps.
    assert max(latencies) < long_seconds[0] / 4, (latencies, long_seconds)


def test_stop_tokens_strings_trim_and_min_new_tokens(engine, tokenizer) -> None:
    prompt = [5, 17, 99, 230]
    with engine.client() as client:
        free = _generate(
            client,
            input_ids=prompt,
            sampling_params={"max_new_tokens": 30, "temperature": 0, "ignore_eos": True},
        )["output_ids"]
        stop_id = free[5]
        first = free.index(stop_id)
        out = _generate(
            client,
            input_ids=prompt,
            sampling_params={"max_new_tokens": 30, "temperature": 0, "stop_token_ids": [stop_id]},
        )
        assert out["output_ids"] == free[: first + 1]
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
        assert out["text"] == tokenizer.decode(free[:first])
        kept = _generate(
            client,
            input_ids=prompt,
            sampling_params={
                "max_new_tokens": 30,
                "temperature": 0,
                "stop_token_ids": [stop_id],
                "no_stop_trim": True,
            },
        )
        assert kept["text"] == tokenizer.decode(free[: first + 1])
        # min_new_tokens keeps stop tokens from being sampled until it is reached.
        late = _generate(
            client,
            input_ids=prompt,
            sampling_params={
                "max_new_tokens": 30,
                "min_new_tokens": 12,
                "stop_token_ids": [stop_id],
                "sampling_seed": 1,
            },
        )
        assert stop_id not in late["output_ids"][:12]
        # A stop string ends generation; the text is cut before it unless no_stop_trim.
        full_text = tokenizer.decode(free)
        stop = full_text[len(tokenizer.decode(free[:8])) :][:2]
        assert stop
        cut = _generate(
            client, input_ids=prompt, sampling_params={"max_new_tokens": 30, "temperature": 0, "stop": [stop]}
        )
        assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert cut["text"] == full_text[: full_text.find(stop)]
        assert stop not in cut["text"]
        nothing = _generate(client, input_ids=prompt, sampling_params={"max_new_tokens": 0})
        assert nothing["output_ids"] == [] and nothing["meta_info"]["finish_reason"]["type"] == "length"


def test_batch_request_and_input_logprobs(engine, reference) -> None:
    with engine.client() as client:
        out = client.post(
            "/generate",
            json={
                "input_ids": [[5, 6, 7], [8, 9]],
                "sampling_params": [
                    {"max_new_tokens": 2, "temperature": 0},
                    {"max_new_tokens": 3, "temperature": 0},
                ],
                "return_logprob": True,
                "logprob_start_len": 0,
            },
        ).json()
    assert [len(o["output_ids"]) for o in out] == [2, 3]
    entries = out[0]["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in entries] == [5, 6, 7] and entries[0][0] is None
    with torch.no_grad():
        logits = reference(torch.tensor([[5, 6, 7]])).logits[0].float()
    expected = torch.log_softmax(logits[:2], dim=-1)[[0, 1], [6, 7]]
    assert torch.allclose(torch.tensor([e[0] for e in entries[1:]]), expected, atol=1e-4)


def test_streaming_chunks_are_cumulative_and_end_with_done(engine) -> None:
    body = {
        "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        "stream": True,
        "return_logprob": True,
    }
    with engine.client() as client, client.stream("POST", "/generate", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert [len(c["output_ids"]) for c in chunks] == [1, 2, 3, 4, 5, 6]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert len(chunks[-1]["meta_info"]["output_token_logprobs"]) == 6


def test_abort_mid_generation_returns_partial_tokens(engine) -> None:
    body = {
        "rid": "to-abort",
        "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": 500, "ignore_eos": True},
        "stream": True,
        "return_logprob": True,
    }
    seen = 0
    with engine.client() as client:
        with client.stream("POST", "/generate", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                last = json.loads(line.removeprefix("data: "))
                seen += 1
                if seen == 5:
                    assert client.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        assert 5 <= len(last["output_ids"]) < 500
        assert len(last["meta_info"]["output_token_logprobs"]) == len(last["output_ids"])

        # abort_all on a non-streaming request: it answers with what it produced so far.
        result = {}
        worker = threading.Thread(
            target=lambda: result.update(
                _generate(
                    client, input_ids=[5, 6], sampling_params={"max_new_tokens": 500, "ignore_eos": True}
                )
            )
        )
        worker.start()
        deadline = time.monotonic() + 10
        while client.get("/get_server_info").json()["internal_states"][0]["num_running_reqs"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.05)
        assert client.post("/abort_request", json={"abort_all": True}).status_code == 200
        worker.join(timeout=30)
        assert result["meta_info"]["finish_reason"]["type"] == "abort"
        assert 0 < len(result["output_ids"]) < 500


def test_pause_holds_new_requests_until_continue(engine) -> None:
    with engine.client() as client:
        assert client.post("/pause_generation", json={"mode": "in_place"}).json()["status"] == "ok"
        result = {}
        worker = threading.Thread(
            target=lambda: result.update(
                _generate(client, input_ids=[9], sampling_params={"max_new_tokens": 2})
            )
        )
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive()
        assert client.get("/flush_cache").status_code == 400  # a request is queued
        assert client.get("/health_generate").status_code == 200
        assert client.post("/continue_generation").status_code == 200
        worker.join(timeout=30)
        assert len(result["output_ids"]) == 2
        assert client.get("/flush_cache").status_code == 200


def test_pause_in_retract_mode_resumes_the_same_sequence(engine) -> None:
    body = {
        "input_ids": [21, 22, 23],
        "sampling_params": {"max_new_tokens": 200, "ignore_eos": True, "sampling_seed": 8},
        "return_logprob": True,
    }
    with engine.client() as client:
        uninterrupted = _generate(client, **body)
        result = {}
        worker = threading.Thread(target=lambda: result.update(_generate(client, **body)))
        worker.start()
        deadline = time.monotonic() + 10
        while client.get("/get_server_info").json()["internal_states"][0]["num_running_reqs"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.post("/pause_generation", json={"mode": "retract"}).status_code == 200
        state = client.get("/get_server_info").json()["internal_states"][0]
        assert state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 1
        assert client.post("/continue_generation").status_code == 200
        worker.join(timeout=60)
    # The retracted request was prefilled again from its prompt and tokens so far, then continued unchanged.
    assert result["output_ids"] == uninterrupted["output_ids"]
    got = torch.tensor([e[0] for e in result["meta_info"]["output_token_logprobs"]])
    want = torch.tensor([e[0] for e in uninterrupted["meta_info"]["output_token_logprobs"]])
    assert torch.allclose(got, want, atol=1e-5)


def test_release_and_resume_memory_round_trip_gives_identical_outputs(engine) -> None:
    body = {
        "input_ids": [11, 12, 13],
        "sampling_params": {"max_new_tokens": 20, "ignore_eos": True, "sampling_seed": 4},
        "return_logprob": True,
    }
    with engine.client() as client:
        before = _generate(client, **body)
        assert client.post("/release_memory_occupation", json={}).status_code == 200
        assert client.get("/get_server_info").json()["internal_states"][0]["released_tags"] == [
            "cuda_graph",
            "kv_cache",
            "weights",
        ]
        result = {}
        worker = threading.Thread(target=lambda: result.update(_generate(client, **body)))
        worker.start()
        time.sleep(0.3)
        assert worker.is_alive(), "generated while the memory was released"
        assert client.post("/resume_memory_occupation", json={"tags": ["weights"]}).status_code == 200
        time.sleep(0.2)
        assert worker.is_alive(), "generated without a KV cache"
        assert (
            client.post("/resume_memory_occupation", json={"tags": ["kv_cache", "cuda_graph"]}).status_code
            == 200
        )
        worker.join(timeout=30)
    assert result["output_ids"] == before["output_ids"]
    assert result["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input_ids": [1], "sampling_params": {"temperature": -0.5}}, "sampling_params.temperature"),
        ({"input_ids": [1], "sampling_params": {"top_p": 0}}, "sampling_params.top_p"),
        ({"input_ids": [1], "sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": "ten"}}, "sampling_params.max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"temprature": 1}}, "sampling_params.temprature"),
        ({"input_ids": "1 2 3"}, "input_ids"),
        ({"input_ids": [1, 99999]}, "input_ids"),
        ({"input_ids": list(range(3, 400)) * 2}, "input_ids"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 600}}, "sampling_params.max_new_tokens"),
        (
            {"input_ids": [1], "sampling_params": {"repetition_penalty": 1.2}},
            "sampling_params.repetition_penalty",
        ),
        ({}, "input_ids"),
    ],
)
def test_bad_generate_requests_name_the_field(engine, body, field) -> None:
    with engine.client() as client:
        response = client.post("/generate", json=body)
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert error["field"].startswith(field), error
    assert field.split(".")[-1] in error["message"] or "input" in error["message"].lower()


def test_malformed_json_and_management_errors(engine) -> None:
    with engine.client() as client:
        response = client.post(
            "/generate", content=b'{"input_ids": [1,', headers={"content-type": "application/json"}
        )
        assert response.status_code == 422 and response.json()["error"]["field"] == "body"
        response = client.post("/release_memory_occupation", json={"tags": ["gpu"]})
        assert response.status_code == 400 and response.json()["error"]["field"] == "tags"
        response = client.post("/pause_generation", json={"mode": "later"})
        assert response.status_code == 400 and response.json()["error"]["field"] == "mode"


def test_info_endpoints_metrics_and_weight_version_header(engine, tiny_model_dir) -> None:
    with engine.client() as client:
        info = client.get("/get_server_info").json()
        assert info["model_path"] == str(tiny_model_dir) and info["tp_size"] == 1
        assert client.get("/get_model_info").json()["is_generation"] is True
        response = client.get("/get_weight_version")
        assert response.json() == {"weight_version": "default"}
        assert response.headers["x-weight-version"] == "default"
        assert client.get("/health_generate").status_code == 200
        _generate(client, input_ids=[3, 4], sampling_params={"max_new_tokens": 3, "ignore_eos": True})
        metrics = client.get("/metrics").text
    for name in (
        "slime_rollout_engine_requests_total",
        "slime_rollout_engine_prompt_tokens_total",
        "slime_rollout_engine_generation_tokens_total",
        "slime_rollout_engine_num_running_reqs",
        "slime_rollout_engine_num_waiting_reqs",
        "slime_rollout_engine_time_to_first_token_seconds_bucket",
        "slime_rollout_engine_inter_token_latency_seconds_bucket",
        "slime_rollout_engine_kv_cache_usage",
        'slime_rollout_engine_weight_version_info{version="default"}',
    ):
        assert name in metrics, name
    generated = [
        line
        for line in metrics.splitlines()
        if line.startswith("slime_rollout_engine_generation_tokens_total")
    ]
    assert float(generated[0].split()[-1]) >= 3


def test_openai_completions_and_chat(engine, tokenizer) -> None:
    with engine.client() as client:
        completion = client.post(
            "/v1/completions",
            json={"prompt": "The answer is", "max_tokens": 5, "temperature": 0, "logprobs": 2},
        ).json()
        choice = completion["choices"][0]
        assert completion["usage"]["completion_tokens"] == 5 and choice["finish_reason"] == "length"
        assert (
            len(choice["logprobs"]["token_logprobs"]) == 5 and len(choice["logprobs"]["top_logprobs"][0]) <= 2
        )
        same = client.post(
            "/generate",
            json={"text": "The answer is", "sampling_params": {"max_new_tokens": 5, "temperature": 0}},
        ).json()
        assert choice["text"] == same["text"]

        messages = [{"role": "user", "content": "What is 2 + 3?"}]
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True},
        ).json()
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert chat["usage"]["prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert len(chat["choices"][0]["logprobs"]["content"]) == chat["usage"]["completion_tokens"]

        body = {"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert streamed == chat["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

        bad = client.post("/v1/chat/completions", json={"messages": messages, "top_p": 2})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "top_p"
        assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 512
