"""The OpenAI-compatible server, exercised over real HTTP on a free loopback port."""

import asyncio
import concurrent.futures
import http.client
import json
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest

import nanoserve
from nanoserve import LLM, SamplingParams
from server import make_server
from test_robustness import read_reply


def start(model, **kwargs):
    path, tok = model
    server_kw = {k: kwargs.pop(k) for k in ("max_waiting", "api_key", "read_timeout", "max_connections")
                 if k in kwargs}
    llm = LLM(path, device="cpu", tokenizer=tok, max_model_len=256, **kwargs)
    server = make_server(llm, "127.0.0.1", 0, **server_kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1], llm


@pytest.fixture(scope="module")
def served(model):
    server, port, llm = start(model)
    yield port, llm, server
    server.shutdown()
    server.server_close()


def request(port, method, path, body=None, raw: bytes | None = None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


def client(port, api_key="none"):
    """The real `openai` client on the server, without retries (a test sees every answer)."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=60)


def completion(port, **body):
    status, text = request(port, "POST", "/v1/completions", body)
    return status, json.loads(text)


def stream(port, **body):
    """-> list of parsed SSE chunks (the final [DONE] checked and dropped)."""
    status, text = request(port, "POST", "/v1/completions", dict(body, stream=True))
    assert status == 200
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def wait_idle(llm, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        st = llm.stats()
        if st["num_running"] == 0 and st["num_waiting"] == 0 and st["kv_blocks_free"] == st["kv_blocks_total"]:
            return st
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {llm.stats()}")


def test_plain_completion_has_openai_shape(served):
    port, llm, _ = served
    status, out = completion(port, prompt="def add(a, b):", max_tokens=12, temperature=0, logprobs=2)
    assert status == 200
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    choice = out["choices"][0]
    assert choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    assert out["usage"]["completion_tokens"] == len(choice["logprobs"]["tokens"])
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    ref = llm.engine.tokenizer
    assert out["usage"]["prompt_tokens"] == len(ref.encode("def add(a, b):"))
    assert all(len(d) >= 1 for d in choice["logprobs"]["top_logprobs"])
    wait_idle(llm)


def test_streamed_completion_concatenates_to_the_plain_one(served):
    port, llm, _ = served
    body = dict(prompt="import os\n", max_tokens=20, temperature=0.8, seed=7, ignore_eos=True, user="u1")
    _, plain = completion(port, **body)
    chunks = stream(port, **body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert not any(c.get("usage") for c in chunks)              # usage only when asked for
    chunks = stream(port, stream_options={"include_usage": True}, **body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == plain["choices"][0]["text"]


def test_max_tokens_beyond_the_context_is_a_400_naming_the_limit(served):
    port, llm, _ = served
    status, out = completion(port, prompt="x", max_tokens=10_000)
    assert status == 400 and out["error"]["param"] == "max_tokens" and "max_model_len 256" in out["error"]["message"]
    assert completion(port, prompt="x")[0] == 200               # the default max_tokens fits


def test_token_id_prompts_and_stop_strings(served):
    port, llm, _ = served
    _, free = completion(port, prompt=[1, 100, 200, 300], max_tokens=24, temperature=0, ignore_eos=True)
    text = free["choices"][0]["text"]
    stop = text[5:7]
    _, stopped = completion(port, prompt=[1, 100, 200, 300], max_tokens=24, temperature=0, stop=stop,
                            ignore_eos=True)
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == text[:text.find(stop)]


def test_fifty_concurrent_streams_interleave(served):
    port, llm, _ = served
    results, errors = {}, []
    together = threading.Barrier(50)          # all send at once: a thread started late is no stream

    def client(i):
        try:
            together.wait(timeout=60)
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/v1/completions", json.dumps(dict(
                prompt=f"x = {i}\n", max_tokens=16, temperature=1.0, seed=i, ignore_eos=True, stream=True)))
            resp = conn.getresponse()
            times, text = [], ""
            for line in resp:
                line = line.decode().strip()
                if line.startswith("data: {"):
                    times.append(time.perf_counter() - t0)
                    text += json.loads(line[6:])["choices"][0]["text"]
            results[i] = (times, text)
        except Exception as e:  # noqa: BLE001  (collected and reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 50
    assert all(len(times) >= 2 for times, _ in results.values())
    # Interleaved: some stream got its first token before another one had finished.
    firsts = [times[0] for times, _ in results.values()]
    lasts = [times[-1] for times, _ in results.values()]
    assert min(lasts) > sorted(firsts)[len(firsts) // 2]
    wait_idle(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_client_disconnect_aborts_the_request_and_frees_its_blocks(model, async_scheduling):
    server, port, llm = start(model, async_scheduling=async_scheduling)
    step = llm.engine.step
    llm.engine.step = lambda: (time.sleep(0.02), step())[1]     # 200 tokens take 4 s or more
    before = server.async_engine.finished.get("abort", 0)
    for is_stream in (True, False):
        sock = socket.create_connection(("127.0.0.1", port))
        body = json.dumps(dict(prompt="while True:", max_tokens=200, ignore_eos=True, stream=is_stream)).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if is_stream:
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        else:
            time.sleep(0.3)
        sock.close()
        st = wait_idle(llm, timeout=3)
        assert st["kv_blocks_free"] == st["kv_blocks_total"]
    assert server.async_engine.finished.get("abort", 0) == before + 2
    server.shutdown()
    server.server_close()


def test_async_scheduling_serves_what_synchronous_steps_serve(model):
    """The server's engine loop with async scheduling on: concurrent plain and streamed
    completions (greedy or seeded, stop strings, logprobs) get exactly the text, finish
    reasons and logprob tokens a synchronous engine serves, and the engine ends idle."""
    bodies = [dict(prompt=f"def f{i}(x):\n", max_tokens=10 + 2 * i, temperature=0 if i % 3 == 0 else 0.8, seed=i,
                   logprobs=2 if i % 2 else None, stop=["\n\n", ":"] if i % 4 == 1 else None) for i in range(8)]
    served = {}
    for async_scheduling in (False, True):
        server, port, llm = start(model, async_scheduling=async_scheduling)
        try:
            assert llm.engine.async_scheduling is async_scheduling
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                plain = list(pool.map(lambda b: completion(port, **b)[1]["choices"][0], bodies))
                streamed = list(pool.map(lambda b: "".join(c["choices"][0]["text"] for c in stream(port, **b)),
                                         bodies))
            assert streamed == [c["text"] for c in plain]
            served[async_scheduling] = [(c["text"], c["finish_reason"], (c["logprobs"] or {}).get("tokens"))
                                        for c in plain]
            wait_idle(llm)
        finally:
            server.shutdown()
            server.server_close()
    assert served[True] == served[False]
    assert {reason for _, reason, _ in served[True]} == {"stop", "length"}


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (json.dumps({"max_tokens": 5}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, "max_tokens"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"prompt": "x", "n": 0}).encode(), 400, "n"),
    (json.dumps({"prompt": "x", "n": 3, "best_of": 2}).encode(), 400, "best_of"),
    (json.dumps({"prompt": "x", "n": 2, "best_of": 3, "stream": True}).encode(), 400, "best_of"),
    (json.dumps({"prompt": 12}).encode(), 400, "prompt"),
    (json.dumps({"prompt": [1, 10 ** 7]}).encode(), 400, "prompt"),
    (json.dumps({"prompt": list(range(1, 300))}).encode(), 400, "prompt"),
    (json.dumps({"prompt": ""}).encode(), 400, "prompt"),
    (json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), 404, "model"),
    (json.dumps([1, 2]).encode(), 400, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, param):
    port, llm, _ = served
    got, text = request(port, "POST", "/v1/completions", raw=body)
    assert got == status
    err = json.loads(text)["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    assert completion(port, prompt="ok", max_tokens=2)[0] == 200
    wait_idle(llm)


def test_oversized_bodies_and_unknown_routes(served):
    port, _, _ = served
    # The server answers from the headers alone, without reading a 2 MiB body.
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n{")
    reply = b""
    while b"}}" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413") and b'"error"' in reply
    assert request(port, "GET", "/v2/nothing")[0] == 404
    assert request(port, "POST", "/v1/chat/nothing", {"prompt": "x"})[0] == 404
    assert completion(port, prompt="ok", max_tokens=2)[0] == 200


def test_models_health_and_metrics(served):
    port, llm, server = served
    status, text = request(port, "GET", "/health")
    assert status == 200 and json.loads(text)["status"] == "ok"
    models = json.loads(request(port, "GET", "/v1/models")[1])
    assert models["data"][0]["id"]
    completion(port, prompt="a", max_tokens=3)
    wait_idle(llm)
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    values = dict(re.findall(r"^(nanoserve_[a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M))
    st = llm.stats()
    assert int(values["nanoserve_kv_blocks_total"]) == st["kv_blocks_total"]
    assert int(values["nanoserve_kv_blocks_free"]) == st["kv_blocks_total"]
    assert int(values["nanoserve_requests_running"]) == 0 and int(values["nanoserve_requests_waiting"]) == 0
    assert int(values["nanoserve_generation_tokens_total"]) == st["generated_tokens"]
    finished = sum(int(v) for k, v in values.items() if k.startswith("nanoserve_requests_finished_total"))
    aborted = int(values.get('nanoserve_requests_finished_total{finish_reason="abort"}', 0))
    # Every request that produced a token is in the TTFT histogram, once.
    assert int(values['nanoserve_time_to_first_token_seconds_bucket{le="+Inf"}']) >= finished - aborted
    assert int(values["nanoserve_time_to_first_token_seconds_count"]) == \
        int(values['nanoserve_time_to_first_token_seconds_bucket{le="+Inf"}'])


def test_overload_beyond_the_waiting_queue_answers_429(model):
    openai = pytest.importorskip("openai")
    server, port, llm = start(model, max_num_seqs=1, max_waiting=2)
    try:
        c = client(port)               # warmed up before the queue fills: its first call imports for a while
        c.completions.create(model=server.model_name, prompt="y", max_tokens=1)
        step = llm.engine.step
        llm.engine.step = lambda: (time.sleep(0.02), step())[1]     # 100 tokens take 2 s or more
        threads = [threading.Thread(target=completion, args=(port,), kwargs=dict(
            prompt="x", max_tokens=100 if i == 0 else 2, ignore_eos=True)) for i in range(3)]

        def wait_for(key, n):
            end = time.time() + 10
            while llm.stats()[key] < n and time.time() < end:
                time.sleep(0.01)
        threads[0].start()
        wait_for("num_running", 1)                        # the first one is running
        threads[1].start(), threads[2].start()
        wait_for("num_waiting", 2)                        # the other two wait for its seat
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=server.model_name, prompt="y", max_tokens=2)
        assert e.value.body["type"] == "rate_limit_error" and e.value.code == "rate_limit_exceeded"
        assert int(e.value.response.headers["Retry-After"]) >= 1       # whole seconds, as HTTP defines it
        for t in threads:
            t.join()
        assert completion(port, prompt="y", max_tokens=2)[0] == 200
        wait_idle(llm)
    finally:
        server.shutdown()
        server.server_close()


def test_logprobs_tokens_are_text_that_joins_with_offsets_and_top_logprobs_keyed_by_text(served):
    port, llm, _ = served
    status, out = completion(port, prompt="def add(a, b):", max_tokens=16, temperature=0, logprobs=3, ignore_eos=True)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert status == 200 and "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 16
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(16)]
    assert not any(t.startswith("▁") or t.startswith("<0x") for t in lp["tokens"])   # no raw pieces
    for tok, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert max(top.values()) == pytest.approx(logprob)      # greedy: the chosen one is the top
        if tok and "\ufffd" not in tok:
            assert top[tok] == pytest.approx(logprob)           # keyed by the same text


def test_echo_returns_the_prompt_and_its_logprobs_first(served, model):
    port, llm, _ = served
    body = dict(prompt="def add(a, b):", max_tokens=6, temperature=0, ignore_eos=True)
    _, plain = completion(port, **body)
    status, out = completion(port, echo=True, logprobs=1, **body)
    choice, n_prompt = out["choices"][0], out["usage"]["prompt_tokens"]
    assert status == 200 and choice["text"] == "def add(a, b):" + plain["choices"][0]["text"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == n_prompt + 6 and "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ids = llm.tokenizer.encode("def add(a, b):")
    own = LLM(model[0], device="cpu", tokenizer=model[1], max_model_len=256)     # the server owns llm's engine
    ref = own.generate(ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))[0].prompt_logprobs
    assert lp["token_logprobs"][1:n_prompt] == pytest.approx([ref[i][ids[i]] for i in range(1, n_prompt)], abs=1e-5)
    chunks = stream(port, echo=True, **body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


def test_api_key_is_required_on_v1_routes_while_health_and_metrics_stay_open(model):
    openai = pytest.importorskip("openai")
    server, port, llm = start(model, api_key="sk-test-key")
    try:
        good = client(port, api_key="sk-test-key")
        assert good.models.list().data[0].id == server.model_name
        done = good.completions.create(model=server.model_name, prompt="def f(x):", max_tokens=3)
        assert done.usage.completion_tokens == 3
        for wrong in ("sk-test-ke", "sk-test-key2", "none"):
            with pytest.raises(openai.AuthenticationError) as e:
                client(port, api_key=wrong).completions.create(model=server.model_name, prompt="x", max_tokens=2)
            assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
            assert e.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.AuthenticationError):
            client(port, api_key="wrong").models.list()
        # Without the header: OpenAI's "no key" shape (code null), and the Bearer challenge.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/nowhere"):   # even a 404 is not shown
            conn.request("POST", path, json.dumps({"prompt": "x", "max_tokens": 2}))
            r = conn.getresponse()
            err = json.loads(r.read())["error"]
            assert r.status == 401 and r.getheader("WWW-Authenticate") == "Bearer" and err["code"] is None, path
        conn.request("GET", "/v1/models", headers={"Authorization": "Basic c2stdGVzdC1rZXk="})
        r = conn.getresponse()
        assert r.status == 401 and json.loads(r.read())["error"]["message"]
        conn.close()                                   # the keep-alive connection stayed in step throughout
        assert request(port, "GET", "/health")[0] == 200
        status, text = request(port, "GET", "/metrics")
        assert status == 200 and "nanoserve_request_errors_total" in text
        wait_idle(llm)
    finally:
        server.shutdown()
        server.server_close()


def test_api_key_comes_from_the_flag_or_else_NANOSERVE_API_KEY_and_keys_no_client_can_send_are_refused(
        served, monkeypatch):
    _, llm, _ = served
    monkeypatch.delenv("NANOSERVE_API_KEY", raising=False)
    assert nanoserve.build_parser().parse_args(["--serve"]).api_key is None
    monkeypatch.setenv("NANOSERVE_API_KEY", "from-env")
    assert nanoserve.build_parser().parse_args(["--serve"]).api_key == "from-env"
    assert nanoserve.build_parser().parse_args(["--serve", "--api-key", "from-flag"]).api_key == "from-flag"
    for bad in ("", " sk-secret", "sk-secret\n", "sk-se\tcret"):
        with pytest.raises(ValueError, match="api_key must be") as e:
            make_server(llm, "127.0.0.1", 0, api_key=bad)
        assert "secret" not in str(e.value)                              # the key is not echoed


def test_error_codes_are_strings_or_null_never_numbers(served):
    """OpenAI's error.code is a string ("model_not_found") or null; the status is the HTTP status."""
    openai = pytest.importorskip("openai")
    port, llm, server = served
    c = client(port)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=server.model_name, prompt="x", temperature=-1)
    assert e.value.code is None and e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-9", prompt="x")
    assert e.value.code == "model_not_found"
    for method, path, body in (("GET", "/v2/nothing", None), ("DELETE", "/v1/models", None),
                               ("POST", "/v1/completions", {"prompt": 12})):
        status, text = request(port, method, path, body)
        code = json.loads(text)["error"]["code"]
        assert status >= 400 and (code is None or isinstance(code, str)), (method, path, code)


# ----------------------------------------------------------------------------- HTTP, Hypercorn's work

def test_two_requests_share_one_keep_alive_connection(served):
    port, _, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    ends = []
    for _ in range(2):
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2}))
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 2
        ends.append(conn.sock.getsockname())
    assert ends[0] == ends[1]                                  # the same connection: no reconnect
    conn.close()


def test_a_chunked_request_body_is_read(served):
    port, _, _ = served
    body = json.dumps({"prompt": "def f(x):", "max_tokens": 3}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + chunks + b"0\r\n\r\n")
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 200")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["usage"]["completion_tokens"] == 3


def test_conflicting_content_lengths_get_a_400(served):
    port, _, _ = served
    body = b'{"prompt": "x", "max_tokens": 2}'
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), len(body) - 4, body))
        assert read_reply(sock).startswith(b"HTTP/1.1 400")
    assert completion(port, prompt="ok", max_tokens=2)[0] == 200


def test_a_client_trickling_its_headers_is_dropped_at_the_read_timeout(model):
    """One header byte every 0.2 s: the connection is closed read_timeout (1 s) after it
    opened, long before the headers are complete, and no request reaches the engine."""
    server, port, llm = start(model, read_timeout=1.0)
    try:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            t = time.perf_counter()
            closed_after = None
            for byte in head:
                try:
                    sock.send(bytes([byte]))
                    if sock.recv(100) == b"":
                        closed_after = time.perf_counter() - t
                        break
                except socket.timeout:
                    continue                                  # still open: the next byte
                except OSError:
                    closed_after = time.perf_counter() - t
                    break
        assert closed_after is not None and 0.8 < closed_after < 3, closed_after
        assert llm.stats()["generated_tokens"] == 0
        assert completion(port, prompt="ok", max_tokens=2)[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_requests_beyond_max_connections_get_a_503_and_the_server_recovers(model):
    server, port, llm = start(model, max_connections=2)
    step = llm.engine.step
    llm.engine.step = lambda: (time.sleep(0.02), step())[1]     # 100 tokens take 2 s or more
    try:
        streams = []
        for i in range(2):                                         # two streams hold both places
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            body = json.dumps({"prompt": f"x{i}", "max_tokens": 100, "ignore_eos": True, "stream": True}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
            streams.append(sock)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        r = conn.getresponse()
        err = json.loads(r.read())["error"]
        assert r.status == 503 and r.getheader("Retry-After") == "1" and "--max-connections" in err["message"]
        conn.close()
        for sock in streams:
            sock.close()
        deadline = time.time() + 10
        while server.in_flight and time.time() < deadline:       # the aborted streams end
            time.sleep(0.05)
        assert completion(port, prompt="ok", max_tokens=2)[0] == 200
        wait_idle(llm)
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_leaving_mid_body_leaves_no_traceback_and_the_server_serves_on(served, capfd):
    port, llm, _ = served
    capfd.readouterr()
    for is_stream in (False, True):
        body = json.dumps({"prompt": "x", "max_tokens": 50, "stream": is_stream}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body[:10]))
        time.sleep(0.3)
        sock.close()
    time.sleep(0.5)
    assert completion(port, prompt="ok", max_tokens=2)[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err
    wait_idle(llm)


def test_a_thousand_concurrent_streams_share_one_thread(model):
    """1,000 clients stream at once (asyncio clients in this thread): every stream ends
    with [DONE], most were open at the same time, and the process holds no more threads
    than before: the server's streams live on its one event loop, not a thread each.
    About 6 s on 2 cores."""
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2 * n + 200:                            # both ends of every connection are in this process
        if hard != resource.RLIM_INFINITY and hard < 2 * n + 200:
            pytest.skip(f"{2 * n + 200} file descriptors needed, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2 * n + 200, hard))
    server, port, llm = start(model, max_waiting=2 * n)
    threads = threading.active_count()
    peak = [threads, 0]                               # threads, requests in flight

    async def client(i: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"prompt": [1, 10 + i % 50], "max_tokens": 4, "ignore_eos": True, "stream": True}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = await reader.read()                   # to the end: the server closes after [DONE]
        writer.close()
        return reply

    async def all_clients() -> list:
        async def watch() -> None:
            while True:
                peak[0] = max(peak[0], threading.active_count())
                peak[1] = max(peak[1], server.in_flight)
                await asyncio.sleep(0.1)
        watcher = asyncio.create_task(watch())
        replies = await asyncio.gather(*[client(i) for i in range(n)], return_exceptions=True)
        watcher.cancel()
        return replies

    try:
        t = time.perf_counter()
        replies = asyncio.run(all_clients())
        elapsed = time.perf_counter() - t
        failed = [r for r in replies if not (isinstance(r, bytes) and b"data: [DONE]" in r)]
        assert not failed, (len(failed), failed[:2])
        assert peak[0] <= threads, (peak[0], threads)
        assert peak[1] >= n // 2, peak[1]             # most streams were open at once
        assert elapsed < 120, elapsed
        wait_idle(llm)
    finally:
        server.shutdown()
        server.server_close()


def test_a_busy_port_is_one_line_and_exit_2_before_the_model_loads():
    """The port is bound first: with it taken, --serve fails at once, one line, exit 2,
    before it would have found that the model directory does not exist."""
    from conftest import ROOT
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "nanoserve.py"), "--serve", "--port", str(port),
                               "--model", "/no/such/model"], capture_output=True, text=True, timeout=60)
        elapsed = time.perf_counter() - t
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"nanoserve: error: cannot listen on 127.0.0.1:{port}: ") and "in use" in lines[0]
    assert elapsed < 30, elapsed                      # the interpreter and torch's import, no model
