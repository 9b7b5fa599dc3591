"""Never down, never silent: fault isolation, validation at the edge, a server that always
answers (fuzzed), and a Python API whose calls interleave."""

import gc
import http.client
import json
import random
import socket
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoserve
from nanoserve import LLM, SamplingParams
from server import CHAT_ROLES, make_server

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def make_llm(model, **kw) -> LLM:
    path, tok = model
    return LLM(path, device="cpu", tokenizer=tok, **kw)


def fail_once(runner, after: int = 0) -> list:
    """Make runner.run raise on its (after + 1)-th call, once. -> a list that records it."""
    real, calls, failed = runner.run, [0], []

    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == after + 1 and not failed:
            failed.append(True)
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)
    runner.run = run
    return failed


def assert_no_leak(llm: LLM) -> None:
    st_ = llm.stats()
    assert st_["num_running"] == st_["num_waiting"] == 0
    assert st_["kv_blocks_free"] == st_["kv_blocks_total"]
    assert llm.engine.block_manager.ref_count == [0] * llm.engine.num_blocks


# ----------------------------------------------------------------------------- faults

def test_a_failing_step_fails_only_its_requests_and_the_engine_keeps_serving(model):
    llm = make_llm(model)
    eng = llm.engine
    expected = llm.generate("import os\n", GREEDY)[0].token_ids
    # Two requests run; a third waits for a seat (max_num_seqs = 2) and is not in the step.
    eng.scheduler.cfg.max_num_seqs = 2
    ids = [eng.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in ("a = 1", "b = 2", "c = 3")]
    eng.step()
    failed = fail_once(eng.runner)
    outs = eng.step()
    assert failed and {o.request_id for o in outs} == set(ids[:2])
    assert all(o.finish_reason == "error" and "injected fault" in o.error for o in outs)
    while eng.has_unfinished():                         # the third one is served
        for o in eng.step():
            assert o.request_id == ids[2] and o.finish_reason != "error"
    eng.scheduler.cfg.max_num_seqs = 256
    assert llm.generate("import os\n", GREEDY)[0].token_ids == expected
    assert_no_leak(llm)


def test_the_python_api_raises_for_its_own_failed_request_only(model):
    llm = make_llm(model)
    fail_once(llm.engine.runner)
    with pytest.raises(RuntimeError, match="injected fault"):
        llm.generate(["x = 1", "y = 2"], GREEDY)
    assert len(llm.generate(["x = 1", "y = 2"], GREEDY)) == 2
    assert_no_leak(llm)


def test_a_failing_tokenizer_fails_its_requests_and_leaves_nothing_behind(model):
    """Text is made in the output processor, after the scheduler has appended the tokens; a
    tokenizer that raises there (a sampled id it cannot decode, say) fails the step's requests
    like any fault: an error output each (made without decoding again), no state left."""
    llm = make_llm(model)
    tok = llm.engine.tokenizer
    decode = tok.decode

    def broken(ids):
        raise LookupError("injected decode fault")
    tok.decode = broken
    with pytest.raises(RuntimeError, match="failed inside the engine: LookupError: injected decode fault"):
        llm.generate(["x = 1", "y = 2"], SamplingParams(temperature=0, max_tokens=4))
    tok.decode = decode
    assert not llm.engine.outputs.requests and not llm.engine.outputs.samples
    assert len(llm.generate(["x = 1", "y = 2"], GREEDY)) == 2
    assert_no_leak(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_stream_closed_while_its_last_token_is_on_the_device_leaves_the_next_request_alone(
        model, async_scheduling):
    """A stream closed after its next-to-last token: with async scheduling its last token,
    the one that reached max_tokens, is still on the device and is dropped with it."""
    llm = make_llm(model, async_scheduling=async_scheduling)
    expected = llm.generate("import os\n", GREEDY)[0].token_ids
    for out in llm.stream("def add(a, b):", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)):
        if len(out.token_ids) == 2:
            break                                     # closes the stream: aborts the request
    assert llm.generate("import os\n", GREEDY)[0].token_ids == expected
    assert_no_leak(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_fault_in_a_launch_fails_only_that_steps_requests(model, async_scheduling):
    """Request a ends (max_tokens 1) in the step before the fault; with async scheduling its
    token is still on the device when the next launch fails, and it still ends well."""
    llm = make_llm(model, async_scheduling=async_scheduling)
    eng = llm.engine
    a = eng.add_request("def add(a, b):", SamplingParams(temperature=0, max_tokens=1))
    b = eng.add_request("import os\n", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    outs = eng.step()
    fail_once(eng.runner)
    while eng.has_unfinished():
        outs += eng.step()
    final = {o.request_id: o.finish_reason for o in outs if o.finished}
    assert final == {a: "length", b: "error"}
    assert_no_leak(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_tokenizer_fault_as_a_prompts_samples_start_fails_both_requests_cleanly(model, async_scheduling):
    """Request 0's text fails in the step where request 1's two samples (n = 2) start: with
    async scheduling the second sample exists then but the scheduler has not started it."""
    llm = make_llm(model, async_scheduling=async_scheduling)
    eng = llm.engine
    detokenize = eng.outputs.detokenize

    def broken(req, state):
        if req.request_id == "req-0":
            raise LookupError("injected decode fault")
        return detokenize(req, state)
    eng.add_request("def f():", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))   # streamed
    outs = eng.step()
    eng.outputs.detokenize = broken
    eng.add_request("import os\n", SamplingParams(temperature=0, max_tokens=5, n=2, ignore_eos=True))
    while eng.has_unfinished():
        outs += eng.step()
    assert {o.request_id: o.finish_reason for o in outs if o.finished} == {"req-0": "error", "req-1": "error"}
    assert not eng.outputs.requests
    assert_no_leak(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_outputs_made_before_a_fault_in_the_same_step_are_returned(model, async_scheduling):
    """Request 0 (one token) and request 1 (a prompt of two chunks) start together; the
    scheduler's postprocess fails in the second step. With async scheduling request 0's
    final output is made in that step, before the fault: it is returned with request 1's
    error output (and was, synchronously, the step before)."""
    llm = make_llm(model, async_scheduling=async_scheduling, max_num_batched_tokens=16)
    eng = llm.engine
    postprocess, calls = eng.scheduler.postprocess, []

    def fails_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected fault")
        return postprocess(*args)
    eng.scheduler.postprocess = fails_second
    eng.add_request("def f():", SamplingParams(temperature=0, max_tokens=1), stream=False)
    eng.add_request([1] + list(range(100, 119)), SamplingParams(temperature=0, max_tokens=3), stream=False)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert {o.request_id: o.finish_reason for o in outs if o.finished} == {"req-0": "length", "req-1": "error"}
    assert not eng.outputs.requests
    assert_no_leak(llm)


def test_penalized_samples_beyond_max_num_seqs_get_rows_of_their_own(model):
    """A penalized request's n samples all start in one step, each needing a row of penalty
    counts: past the max_num_seqs + 1 rows while they start; the same tokens as with room."""
    p = SamplingParams(temperature=0.8, seed=3, max_tokens=6, n=5, frequency_penalty=0.5, ignore_eos=True)
    small = make_llm(model, max_num_seqs=2).generate("def f():", p)[0]
    roomy = make_llm(model).generate("def f():", p)[0]
    assert [c.token_ids for c in small.outputs] == [c.token_ids for c in roomy.outputs]


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs,field", [
    ({"top_k": 2 ** 63}, "top_k"), ({"max_tokens": 10 ** 30}, "max_tokens"), ({"seed": 2 ** 64}, "seed"),
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"), ({"ignore_eos": "no"}, "ignore_eos"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"stop": {"ab": 1}}, "stop"), ({"stop": 5}, "stop"), ({"stop": ["a", 3]}, "stop"),
    ({"logprobs": True}, "logprobs"), ({"max_tokens": 2.0}, "max_tokens"), ({"temperature": True}, "temperature"),
])
def test_sampling_params_reject_out_of_range_and_wrong_types(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_top_k_beyond_the_vocabulary_means_no_top_k_and_tiny_temperatures_are_greedy(model):
    llm = make_llm(model)
    vocab = llm.engine.model_config.vocab_size
    logits = torch.randn(4, vocab)
    p_all = nanoserve.sampling_probs(logits, [SamplingParams(top_k=2 ** 62)] * 4)
    torch.testing.assert_close(p_all, logits.softmax(-1))
    greedy = llm.generate("def f(x):", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    tiny = llm.generate("def f(x):", SamplingParams(temperature=1e-40, max_tokens=12, ignore_eos=True))[0]
    assert tiny.token_ids == greedy.token_ids and SamplingParams(temperature=1e-6).temperature == 0


@pytest.mark.parametrize("prompts,msg", [(None, "prompts"), (5, "prompts"), ({"a": 1}, "prompts"),
                                         ([[1, 2], None], r"prompts\[1\]"), ([], "empty"),
                                         ("a\ud800b", "Unicode")])
def test_bad_prompts_name_the_problem(model, prompts, msg):
    llm = make_llm(model)
    with pytest.raises(ValueError, match=msg):
        llm.generate(prompts, GREEDY)
    assert_no_leak(llm)


def test_a_tuple_of_token_ids_is_one_prompt(model):
    llm = make_llm(model)
    outs = llm.generate((1, 20, 30), GREEDY)
    assert len(outs) == 1 and outs[0].prompt_token_ids == [1, 20, 30]
    assert llm.generate([(1, 20, 30), [1, 20, 30]], GREEDY)[1].token_ids == outs[0].token_ids


# ----------------------------------------------------------------------------- Python API

def test_streams_and_generate_interleave_and_each_gets_its_own_outputs(model):
    llm = make_llm(model)
    p = SamplingParams(temperature=0.8, max_tokens=24, seed=3, ignore_eos=True)
    prompts = ["import os\n", "def f(x):", "class A:", "for i in"]
    ref = {x: llm.generate(x, p)[0] for x in prompts}
    s1, s2 = llm.stream(prompts[0], p), llm.stream(prompts[1], p)
    got = {prompts[0]: [next(s1)], prompts[1]: []}
    middle = llm.generate(prompts[2], p)[0]                    # runs while both streams are open
    got[prompts[1]] += list(s2)                                # drain the second stream first
    got[prompts[0]] += list(s1)
    assert middle.token_ids == ref[prompts[2]].token_ids
    for x in prompts[:2]:
        assert "".join(o.delta for o in got[x]) == ref[x].text
        assert got[x][-1].token_ids == ref[x].token_ids and got[x][-1].finished
        assert all(o.request_id == got[x][0].request_id for o in got[x])
    # An abandoned stream (never iterated, or half-read) aborts its request and frees its blocks.
    s3 = llm.stream(prompts[3], p)
    s4 = llm.stream(prompts[3], p)
    next(s4)
    assert llm.stats()["num_running"] + llm.stats()["num_waiting"] == 2
    del s3, s4
    gc.collect()
    assert_no_leak(llm)
    closed = llm.stream(prompts[3], p)
    next(closed)
    closed.close()
    assert list(closed) == [] and llm.generate(prompts[3], p)[0].token_ids == ref[prompts[3]].token_ids
    assert_no_leak(llm)


# ----------------------------------------------------------------------------- server

def start(model, **server_kw):
    llm = make_llm(model, max_model_len=64)
    server = make_server(llm, "127.0.0.1", 0, **server_kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1], llm


@pytest.fixture(scope="module")
def served(model):
    server, port, llm = start(model, read_timeout=0.5)
    yield port, llm, server
    server.shutdown()
    server.server_close()


def read_reply(sock: socket.socket) -> bytes:
    """Read until the server closes the connection or a complete response is in (headers
    and a Content-Length body, or a chunked body's last chunk)."""
    reply = b""
    while True:
        head, sep, body = reply.partition(b"\r\n\r\n")
        if sep:
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")]
            if length and len(body) >= length[0]:
                return reply
            if not length and body.endswith(b"\r\n0\r\n\r\n"):
                return reply
        chunk = sock.recv(65536)
        if not chunk:
            return reply
        reply += chunk


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes on a fresh connection; the reply (read_reply)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        return read_reply(sock)
    finally:
        sock.close()


def post(body: bytes, path: str = "/v1/completions", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {n}\r\n\r\n").encode() + body


def status_and_json(reply: bytes) -> tuple[int, dict | None]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return status, json.loads(body[:length[0]]) if length else None


def good_tokens(port: int) -> list[int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [1, 20, 30, 40], "max_tokens": 8,
                                                         "temperature": 0, "logprobs": 0}))
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out["choices"][0]["logprobs"]["token_logprobs"], out["choices"][0]["text"]


def wait_idle(llm: LLM, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        st_ = llm.stats()
        if st_["num_running"] == st_["num_waiting"] == 0 and st_["kv_blocks_free"] == st_["kv_blocks_total"]:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {llm.stats()}")


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "x", "stop": 5}', "stop"),
    (b'{"prompt": "x", "temperature": 1e400}', "temperature"),
    (b'{"prompt": "a\\ud800b"}', "prompt"),
    (b'{"prompt": "x", "top_k": 10000000000000000000000000000000, "max_tokens": 3}', "top_k"),
    (b'{"prompt": "x", "ignore_eos": "no"}', "ignore_eos"),
    (b'{"prompt": "x", "stop": {"ab": 1}}', "stop"),
    (b"[" * 100_000 + b"]" * 100_000, None),
])
def test_bodies_that_used_to_get_no_answer_get_a_400(served, raw, param):
    port, llm, _ = served
    status, body = status_and_json(raw_exchange(port, post(raw)))
    assert status == 400 and body["error"]["message"]
    if param:
        assert body["error"]["param"] == param
    wait_idle(llm)


def test_top_k_beyond_the_vocabulary_is_served(served):
    port, llm, _ = served
    status, body = status_and_json(raw_exchange(port, post(b'{"prompt": "x", "top_k": 100000, "max_tokens": 3}')))
    assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_methods_routes_and_keep_alive_stay_in_sync(served):
    port, llm, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    # A POST to an unknown route: its body is read and dropped, the connection stays usable.
    conn.request("POST", "/v1/nothing", json.dumps({"prompt": "x" * 500}))
    r = conn.getresponse()
    assert r.status == 404 and json.loads(r.read())["error"]["type"] == "not_found_error"
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}))
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 2
    for method, path, status in (("GET", "/v1/completions", 405), ("OPTIONS", "/v1/completions", 405),
                                 ("DELETE", "/health", 405), ("PUT", "/nowhere", 404), ("FOO", "/metrics", 405)):
        conn.request(method, path, body=b"{}" if method != "GET" else None)
        r = conn.getresponse()
        assert r.status == status and r.getheader("Content-Type") == "application/json", (method, path)
        assert json.loads(r.read())["error"]["message"]
        if status == 405:
            assert r.getheader("Allow")
    conn.close()
    # A malformed request line: Hypercorn's 400 (HTTP parsing never reaches the app).
    assert raw_exchange(port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")


def test_a_client_that_stalls_mid_body_is_dropped_after_the_read_timeout(served):
    port, llm, server = served
    t = time.perf_counter()
    reply = raw_exchange(port, post(b'{"prompt": "x"}', length=100))       # 14 of 100 bytes
    assert time.perf_counter() - t < 5 and status_and_json(reply)[0] == 408
    assert server.read_timeout == 0.5
    wait_idle(llm)
    assert good_tokens(port)


def test_health_answers_503_when_the_engine_loop_is_not_running(model):
    server, port, llm = start(model)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        server.async_engine.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 503 and json.loads(r.read())["status"] == "error"
    finally:
        server.shutdown()
        server.server_close()


def test_a_fault_in_a_step_fails_its_requests_with_500_and_the_server_keeps_serving(model):
    server, port, llm = start(model)
    try:
        before = good_tokens(port)
        fail_once(llm.engine.runner)
        status, body = status_and_json(raw_exchange(port, post(b'{"prompt": "x", "max_tokens": 4}')))
        assert status == 500 and "injected fault" in body["error"]["message"]
        fail_once(llm.engine.runner, after=2)
        reply = raw_exchange(port, post(b'{"prompt": "x", "max_tokens": 20, "stream": true, "ignore_eos": true}'))
        events = [e for e in reply.split(b"\r\n\r\n", 1)[1].split(b"\n") if e.startswith(b"data: ")]   # chunked
        error = json.loads(events[-2][6:])["error"]
        assert error["type"] == "server_error" and error["code"] is None and events[-1] == b"data: [DONE]"
        assert good_tokens(port) == before
        wait_idle(llm)
        assert server.async_engine.alive()
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------- fuzzing

PARAM_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "logprobs", "ignore_eos",
                "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"]
FIELDS = ["prompt", *PARAM_FIELDS, "stream", "n", "best_of", "echo", "suffix", "model", "user"]
BASE = {"prompt": "def f(x):", "max_tokens": 6, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 1,
        "stop": ["\n\n"], "logprobs": 1, "ignore_eos": False, "stream": False}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=1500, deadline=None, database=None, derandomize=True)
@given(field=st.sampled_from(PARAM_FIELDS), value=json_values)
def test_sampling_params_take_any_json_value_or_raise_value_error_naming_the_field(field, value):
    """Whatever JSON a client sends in a field, SamplingParams either accepts it or raises
    ValueError naming that field: never another exception (which would be a 500)."""
    kwargs = {k: v for k, v in BASE.items() if k in nanoserve.SamplingParams.__dataclass_fields__}
    try:
        nanoserve.SamplingParams(**dict(kwargs, **{field: value}))
    except ValueError as e:
        assert str(e).startswith(field), e


def random_json(rng: random.Random, depth: int = 0) -> object:
    """Any JSON value, every type equally likely at the top: null, booleans, small, int64-edge
    and huge integers, floats (also huge and tiny), strings (also non-ASCII and surrogate
    escapes), lists and objects."""
    kind = rng.randrange(10 if depth < 3 else 8)
    return [None, rng.random() < 0.5, rng.randint(-3, 30), rng.choice([2 ** 63 - 1, 2 ** 63, -2 ** 63 - 1, 10 ** 30]),
            rng.choice([0.0, -0.5, 1e-40, 1e300, rng.uniform(-2, 2)]),
            "".join(rng.choice("ab \n\u00e9\u4e2d\U0001F600") for _ in range(rng.randrange(6))),
            rng.choice(["", "x", "\ud800", "stop", "-1"]), rng.randint(0, 3000),
            [random_json(rng, depth + 1) for _ in range(rng.randrange(4))] if depth < 3 else None,
            {rng.choice(FIELDS): random_json(rng, depth + 1) for _ in range(rng.randrange(3))} if depth < 3 else None
            ][kind]


def random_body(rng: random.Random, i: int) -> bytes:
    """Request body number i: cycles through the kinds so each is well represented."""
    kind = i % 6
    if kind <= 2:                       # a valid request with one or two fields set to any JSON value
        body = dict(BASE, stream=rng.random() < 0.3)
        for _ in range(1 + (kind == 2)):
            body[rng.choice(FIELDS)] = random_json(rng)
    elif kind == 3:                     # plausible values everywhere
        body = {"prompt": rng.choice(["x", "import os\n", [1, 20, 30], [], [1, 10 ** 6], "\u00e9"]),
                "max_tokens": rng.randint(-1, 30), "temperature": rng.choice([0, 1e-30, 0.5, 2.0, -1]),
                "top_k": rng.choice([-1, 0, 5, 10 ** 6]), "stop": rng.choice([None, "", "a", ["\n"], []])}
    elif kind == 4:                     # any JSON document
        body = random_json(rng)
    else:                               # a valid body, as bytes, mutated
        return _mutate(json.dumps(dict(BASE, prompt="x")).encode(), rng)
    return json.dumps(body).encode()


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, i = rng.randrange(3), rng.randrange(len(b) + 1)
        if op == 0 and b:
            del b[min(i, len(b) - 1)]
        elif op == 1:
            b.insert(i, rng.randrange(256))
        elif b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
    return bytes(b)


def fuzz_one(port: int, rng: random.Random, i: int, stats: dict) -> None:
    data = random_body(rng, i)
    if i % 7 == 6:
        data = rng.randbytes(rng.randrange(64))                       # random bytes
    length = len(data)
    if i % 22 == 10:                                                  # a wrong Content-Length
        length = max(0, len(data) + rng.choice([-5, -1, 3]))
    reply = raw_exchange(port, post(data, length=length))
    assert reply.startswith(b"HTTP/1.1 "), (data[:200], reply[:200])
    status = int(reply.split(b" ")[1])
    stats[status] = stats.get(status, 0) + 1
    assert status in (200, 400, 404, 408), (status, data[:300], reply[:300])
    if status != 200:
        assert status_and_json(reply)[1]["error"]["message"]


def test_fuzzed_requests_all_get_answers_and_the_engine_keeps_its_results(served):
    """1,200 generated requests on loopback (a valid body with any JSON value in one or two
    fields, plausible values, any JSON document, mutated JSON, random bytes, wrong
    Content-Lengths); every one is answered with a 200 or a JSON 4xx, a known-good greedy
    request gives the same logprobs before, every 200 requests and after, and no block
    leaks. Able to fail: with SamplingParams' old `list(stop)` (a number in "stop" crashed
    the handler) it gets a 500."""
    port, llm, _ = served
    before = good_tokens(port)
    rng, stats, t = random.Random(0), {}, time.perf_counter()
    for i in range(1200):
        fuzz_one(port, rng, i, stats)
        if i % 200 == 199:
            assert good_tokens(port) == before
        assert time.perf_counter() - t < 600, "fuzzing took too long"
    assert good_tokens(port) == before
    assert stats.get(200, 0) >= 100 and stats.get(400, 0) >= 300, stats    # both paths well exercised
    wait_idle(llm)


# Every field either endpoint reads, and a few it does not (ignored, as OpenAI ignores them).
API_FIELDS = sorted({*FIELDS, "n", "best_of", "messages", "max_completion_tokens", "stream_options",
                     "add_generation_prompt", "top_logprobs", "tools", "response_format"})
# Each JSON type equally likely at the top (json_values favours leaves): null, booleans,
# integers (also beyond int64), floats (also nan and inf, which Python's json writes and reads),
# strings, lists, objects.
any_json_type = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=12),
                          st.lists(json_values, max_size=3), st.dictionaries(st.text(max_size=5), json_values,
                                                                             max_size=3))
# Chat messages: mostly message-shaped, with every part of the shape also replaced by junk.
roles = st.sampled_from([*CHAT_ROLES, "", "wizard", "System"]) | any_json_type
part = st.fixed_dictionaries({}, optional={"type": st.sampled_from(["text", "image_url", ""]) | any_json_type,
                                           "text": st.text(max_size=20) | any_json_type, "image_url": json_values})
tool_call = st.fixed_dictionaries({}, optional={
    "id": st.text(max_size=5) | any_json_type, "type": st.just("function") | any_json_type,
    "function": st.fixed_dictionaries({}, optional={"name": st.text(max_size=8) | any_json_type,
                                                    "arguments": st.text(max_size=12) | any_json_type})
    | any_json_type})
message = st.fixed_dictionaries({}, optional={
    "role": roles, "content": st.text(max_size=40) | st.lists(part, max_size=3) | any_json_type,
    "name": st.text(max_size=8) | any_json_type, "tool_calls": st.lists(tool_call, max_size=2) | any_json_type,
    "tool_call_id": st.text(max_size=6) | any_json_type, "function_call": json_values,
    "extra": json_values}) | any_json_type
# Well-formed messages too, short (max_model_len is 64), so that the served path is exercised.
valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": st.text(max_size=10)},
    optional={"name": st.text(max_size=6)}) | st.fixed_dictionaries(
    {"role": st.just("assistant"), "content": st.none(), "tool_calls": st.lists(st.fixed_dictionaries(
        {"id": st.text(max_size=4), "type": st.just("function"),
         "function": st.fixed_dictionaries({"name": st.text(max_size=6), "arguments": st.just("{}")})}),
        min_size=1, max_size=2)}) | st.fixed_dictionaries(
    {"role": st.just("tool"), "tool_call_id": st.text(min_size=1, max_size=4), "content": st.text(max_size=8)})
conversations = {"valid": st.lists(valid_message, min_size=1, max_size=3),
                 "mixed": st.lists(valid_message | message, min_size=1, max_size=3),
                 "junk": st.lists(message, min_size=1, max_size=4) | any_json_type}
chat_fields = st.fixed_dictionaries({}, optional={"max_tokens": st.integers(1, 8) | any_json_type,
                                                  "temperature": st.just(0) | any_json_type})


def exchange(port: int, path: str, body: dict, timeout: float = 30) -> tuple[int, bytes]:
    """POST a JSON body with http.client (no client-side validation); -> (status, body).
    Raises AssertionError naming the body when no answer comes within timeout seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    except (OSError, http.client.HTTPException) as e:
        raise AssertionError(f"no answer to {path} {json.dumps(body)[:300]}: {e!r}") from None
    finally:
        conn.close()


def assert_well_formed(status: int, data: bytes, what: str) -> None:
    """A 4xx carries OpenAI's error object (code a string or null); a 200 is a response
    or an event stream ending in [DONE]."""
    assert status < 500, (status, what, data[:300])
    if status != 200:
        err = json.loads(data)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), what
        assert err["code"] is None or isinstance(err["code"], str), (what, err)
    elif data.startswith(b"data: "):
        events = [e[6:] for e in data.split(b"\n\n") if e.startswith(b"data: ")]
        assert events[-1] == b"[DONE]", (what, data[-300:])
        assert all("error" not in json.loads(e) for e in events[:-1]), (what, data[:300])
    else:
        assert json.loads(data)["choices"], what


def test_fuzzed_chat_messages_and_fields_never_get_a_5xx_and_the_server_stays_healthy(served):
    """Hypothesis-generated chat messages (any role, content of every JSON type, missing
    fields, text and non-text parts, tool_calls, names, junk) and bodies of both endpoints
    with any of their fields set to a value of any JSON type, sent raw: every one answered,
    none with a 5xx, every error in OpenAI's shape; then /health is 200 and a known-good
    request gives the same logprobs as before. 400 requests: 12-30 s on 2 busy cores. Able
    to fail: an integer error.code (the HTTP status) fails it at the first 4xx; a 500 from
    any bug fails it at once."""
    port, llm, _ = served
    before = good_tokens(port)
    seen: dict[tuple[str, int], int] = {}

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(chat=st.booleans(), body=st.data())
    def one_request(chat: bool, body: st.DataObject) -> None:
        if chat:        # half the conversations well-formed, so that many are served
            kind = body.draw(st.sampled_from(["valid", "valid", "mixed", "junk"]))
            data = dict(body.draw(chat_fields), messages=body.draw(conversations[kind]))
        else:
            data = {"prompt": "def f(x):", "max_tokens": 4}
        fields = st.dictionaries(st.sampled_from(API_FIELDS), any_json_type, min_size=1, max_size=2)
        for name, value in (body.draw(fields) if body.draw(st.booleans()) else {}).items():
            if name != "messages" or body.draw(st.integers(0, 3)) == 0:   # mostly the conversation above
                data[name] = value
        path = "/v1/chat/completions" if chat else "/v1/completions"
        status, reply = exchange(port, path, data)
        assert_well_formed(status, reply, json.dumps(data)[:300])
        seen[path, status] = seen.get((path, status), 0) + 1

    t = time.perf_counter()
    one_request()
    assert time.perf_counter() - t < 120, "fuzzing took too long"
    # Both endpoints, both outcomes, well represented: the bodies are not all rejected.
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert seen.get((path, 200), 0) >= 20 and seen.get((path, 400), 0) >= 20, seen
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    assert good_tokens(port) == before
    wait_idle(llm)


def test_tiny_models_run_on_one_cpu_thread_unless_told_otherwise(model, monkeypatch):
    """Measured in default_cpu_threads' docstring: on a busy 2-core machine a tiny model
    decodes 3.6x slower with 2 threads than with 1."""
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        make_llm(model, cpu_threads=2)
        assert torch.get_num_threads() == 2
        make_llm(model)
        assert torch.get_num_threads() == 1
        assert nanoserve.default_cpu_threads(10 ** 9) is None             # large models: torch's choice
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert nanoserve.default_cpu_threads(10) is None                  # the user's setting wins
        with pytest.raises(ValueError, match="cpu_threads"):
            make_llm(model, cpu_threads=0)
    finally:
        torch.set_num_threads(before)


def test_logit_bias_forces_and_bans_tokens(model):
    llm = make_llm(model)
    greedy = llm.generate("def f(x):", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].token_ids
    forced = llm.generate("def f(x):", SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=1,
                                                      logit_bias={7: 100}))[0].token_ids
    assert forced == [7] * 10
    banned = llm.generate("def f(x):", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                      logit_bias={greedy[0]: -100}))[0].token_ids
    assert greedy[0] not in banned
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate("x", SamplingParams(logit_bias={10 ** 7: 1.0}))
    for bad in ({"a": 1}, {3: 101}, {3: True}, [1, 2]):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_server_takes_penalties_and_logit_bias_with_string_keys(served):
    port, llm, _ = served
    status, body = status_and_json(raw_exchange(port, post(json.dumps(
        {"prompt": [1, 20, 30], "max_tokens": 4, "temperature": 0, "logit_bias": {"9": 100},
         "frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.1}).encode())))
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    for field, value in (("presence_penalty", 3), ("repetition_penalty", 0), ("logit_bias", {"x": 1})):
        status, body = status_and_json(raw_exchange(port, post(json.dumps({"prompt": "x", field: value}).encode())))
        assert status == 400 and body["error"]["param"] == field, field
