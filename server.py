"""nanoserve's OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions,
/v1/models, /health and /metrics, for an LLM or a model Cascade.

An ASGI app (Starlette, as vLLM and SGLang build theirs) on Hypercorn. HTTP itself is
the library's work: parsing, keep-alive, chunked bodies, a 400 for conflicting
Content-Length headers, a deadline for a client that trickles its headers, a disconnect
without a traceback, and thousands of open event streams on one event loop without a
thread each. This file speaks only OpenAI.

Hypercorn was chosen by trying a trivial Starlette app on the three maintained servers
(2-core machine, one header byte every 5 s, 2,000 concurrent 5 s event streams):
  hypercorn 0.18: closed the trickling connection after 5.0 s (its keep_alive_timeout,
                  which also bounds the wait for a request's headers); 2,000 streams in
                  8.2 s; pure asyncio, so it runs in-process on a socket bound beforehand.
  granian 2.8:    closed it after 30 s; 2,000 streams in 10.6 s; a Rust server that
                  runs its own workers.
  uvicorn 0.55:   still open after 80 s.
All three answered conflicting Content-Length headers and a malformed request line with
400, read chunked bodies, and went on serving after a client left mid-body. None
answers 503 beyond a number of connections (uvicorn's --limit-concurrency aside), so
that bound is the small layer OpenAIServer.asgi below.

Usage:
    python nanoserve.py --serve --model DIR --port 8000
    server = make_server(LLM(DIR), "127.0.0.1", 0); threading.Thread(target=server.serve_forever).start()
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import queue
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import AsyncIterator

import hypercorn.asyncio
import hypercorn.config
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from nanoserve import (CHAT_ROLES, LLM, Cascade, CompletionOutput, LLMEngine, OutputProcessor, RequestOutput,
                       SamplingParams, Sequence)

# ============================================================================ errors

class ServingError(Exception):
    """An answer other than 200: HTTP status, message, the offending field, OpenAI's error
    type, and OpenAI's error code: a string ("invalid_api_key") or None, never a number
    (the status is in the status line; clients read `code` as a string)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}


def json_response(status: int, obj: dict, headers: dict | None = None) -> Response:
    # json.dumps, not Starlette's JSONResponse: a logprob can be -inf, which JSONResponse
    # refuses and Python's json (like vLLM's responses) writes as -Infinity.
    return Response(json.dumps(obj), status, headers, media_type="application/json")


def error_response(e: ServingError) -> Response:
    return json_response(e.status, {"error": {"message": e.message, "type": e.kind, "param": e.param,
                                              "code": e.code}}, e.headers)


class NoResponse(Response):
    """What a handler returns for a client that has gone: nothing is sent."""

    def __init__(self) -> None:
        super().__init__()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pass


# ============================================================================ the engine's loop
# One background thread owns the engine and steps it whenever there is work: requests
# from all connections share that one continuous batch, so concurrent clients interleave
# token by token. The event loop only validates, enqueues, and awaits each request's
# outputs, which the engine thread hands over with call_soon_threadsafe.

class OutputQueue:
    """One request's outputs: put by the engine thread, awaited on the server's event loop."""
    cascade: dict | None = None           # under a cascade, once decided: which model answered

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items = loop, asyncio.Queue()

    def put(self, out: RequestOutput) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, out)
        except RuntimeError:
            pass                          # the event loop has stopped: nobody waits for it

    async def get(self) -> RequestOutput:
        return await self.items.get()


class AsyncEngine:
    """Runs LLMEngine.step() in its own thread. Other threads never change the engine: they
    validate a request (read-only), then hand it over through a command queue that the
    loop drains between steps, and await results on the request's OutputQueue. (The
    responses' logprob texts come from engine.outputs' text helpers, which only read the
    tokenizer.)"""

    TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, engine: LLMEngine, max_waiting: int = 256):
        self.engine, self.max_waiting = engine, max_waiting
        engine.owner = "a server's engine thread"           # LLM.generate on it would race this loop
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = 0                              # added, not yet seen by the loop
        self.pending_lock = threading.Lock()          # the event loop adds, the engine thread subtracts
        self.wake = threading.Event()
        self.queues: dict[str, OutputQueue] = {}
        self.ttft_counts = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum, self.finished, self.errors = 0.0, {}, 0
        self.loop_errors = 0                          # exceptions outside a step (none expected)
        self.prompt_tokens = 0
        self.seen: set[str] = set()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="nanoserve-engine", daemon=True)
        self.thread.start()

    def add(self, prompt: str | list[int], params: SamplingParams, fit_max_tokens: bool = False,
            stream: bool = True) -> tuple[str, int, OutputQueue]:
        """Validate and enqueue; -> (request_id, prompt length, its OutputQueue: every step's
        progress if stream, else the final output only). Called on the event loop. Raises
        ValueError for a bad request (also, with fit_max_tokens, when prompt plus max_tokens
        exceed max_model_len, as vLLM answers), ServingError(429) when the queue is full."""
        if len(self.engine.scheduler.waiting) + self.pending >= self.max_waiting:
            # Retry-After: a seat opens whenever a running request finishes, so one second is
            # the honest hint; the openai client waits that long, and longer on each retry.
            raise ServingError(429, f"server overloaded: {self.max_waiting} requests already waiting; "
                               "retry later", kind="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": "1"})
        seq = self.check(prompt, params, fit_max_tokens)
        return seq.request_id, seq.num_prompt_tokens, self.submit(seq, stream)

    def submit(self, seq: Sequence, stream: bool) -> OutputQueue:
        """Hand a checked request to the loop; -> the queue its outputs arrive on."""
        q = OutputQueue(asyncio.get_running_loop())
        self.queues[seq.request_id] = q
        with self.pending_lock:
            self.pending += 1
        self.commands.put(("add", (seq, stream)))
        self.wake.set()
        return q

    def check(self, prompt: str | list[int], params: SamplingParams, fit_max_tokens: bool = False) -> Sequence:
        """The request as a Sequence, or ValueError (read-only: safe from any thread)."""
        seq = self.engine.make_sequence(prompt, params, request_id=f"srv-{uuid.uuid4().hex}")
        limit = self.engine.max_model_len
        if fit_max_tokens and seq.num_prompt_tokens + params.max_tokens > limit:
            raise ValueError(f"max_tokens {params.max_tokens} plus the prompt's {seq.num_prompt_tokens} tokens "
                             f"exceed max_model_len {limit}: ask for at most {limit - seq.num_prompt_tokens}")
        return seq

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))
        self.wake.set()

    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stop

    def _loop(self) -> None:
        """Apply the commands, step, hand each output to its request's queue. A step that
        fails fails only its own requests (LLMEngine.step); anything else that raises here
        is reported, and the loop goes on."""
        while not self._stop:
            try:
                self._apply_commands()
                if not self.engine.has_unfinished():
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out)
            except Exception as e:
                self.loop_errors += 1
                print(f"[nanoserve] engine loop: {type(e).__name__}: {e}", file=sys.stderr)
                time.sleep(0.01)

    def _apply_commands(self) -> None:
        while True:
            try:
                op, arg = self.commands.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                with self.pending_lock:
                    self.pending -= 1
                seq, stream = arg
                self.prompt_tokens += seq.num_prompt_tokens
                self.engine.add_sequence(seq, stream)
            elif arg in self.engine.outputs.requests:    # abort a request still in flight
                self.engine.abort(arg)
                self.finished["abort"] = self.finished.get("abort", 0) + 1
                self.queues.pop(arg, None)

    def _deliver(self, out: RequestOutput) -> None:
        self._record(out)
        q = self.queues.get(out.request_id)
        if q is not None:
            q.put(out)
            if out.finished:
                del self.queues[out.request_id]

    def _record(self, out: RequestOutput) -> None:
        ttft = out.metrics["time_to_first_token"]
        if ttft is not None and out.request_id not in self.seen:      # its first output
            self.seen.add(out.request_id)
            i = next((i for i, b in enumerate(self.TTFT_BUCKETS) if ttft <= b), len(self.TTFT_BUCKETS))
            self.ttft_counts[i] += 1
            self.ttft_sum += ttft
        if out.finished:
            self.seen.discard(out.request_id)
            self.finished[out.finish_reason] = self.finished.get(out.finish_reason, 0) + 1

    def close(self) -> None:
        self._stop = True
        self.wake.set()
        self.thread.join(timeout=5)

    def metrics_text(self) -> str:
        st = self.engine.stats()                          # plain reads, safe from another thread
        lines = [
            "# HELP nanoserve_kv_blocks_total KV cache blocks in the pool.",
            "# TYPE nanoserve_kv_blocks_total gauge", f"nanoserve_kv_blocks_total {st['kv_blocks_total']}",
            "# HELP nanoserve_kv_blocks_free KV cache blocks a new request could take.",
            "# TYPE nanoserve_kv_blocks_free gauge", f"nanoserve_kv_blocks_free {st['kv_blocks_free']}",
            "# TYPE nanoserve_requests_running gauge", f"nanoserve_requests_running {st['num_running']}",
            "# TYPE nanoserve_requests_waiting gauge", f"nanoserve_requests_waiting {st['num_waiting']}",
            "# TYPE nanoserve_generation_tokens_total counter",
            f"nanoserve_generation_tokens_total {st['generated_tokens']}",
            "# TYPE nanoserve_prompt_tokens_total counter", f"nanoserve_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE nanoserve_preemptions_total counter", f"nanoserve_preemptions_total {st['preemptions']}",
            "# TYPE nanoserve_request_errors_total counter", f"nanoserve_request_errors_total {self.errors}",
            "# TYPE nanoserve_requests_finished_total counter",
        ]
        lines += [f'nanoserve_requests_finished_total{{finish_reason="{r}"}} {n}'
                  for r, n in sorted(self.finished.items())]
        for key in ("prefix_cache_hit_rate", "spec_acceptance_rate"):
            if st[key] is not None:
                lines += [f"# TYPE nanoserve_{key} gauge", f"nanoserve_{key} {st[key]:.6f}"]
        lines += ["# HELP nanoserve_time_to_first_token_seconds Time from arrival to first token.",
                  "# TYPE nanoserve_time_to_first_token_seconds histogram"]
        cum = 0
        for b, c in zip(self.TTFT_BUCKETS, self.ttft_counts):
            cum += c
            lines.append(f'nanoserve_time_to_first_token_seconds_bucket{{le="{b}"}} {cum}')
        cum += self.ttft_counts[-1]
        lines += [f'nanoserve_time_to_first_token_seconds_bucket{{le="+Inf"}} {cum}',
                  f"nanoserve_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                  f"nanoserve_time_to_first_token_seconds_count {cum}"]
        return "\n".join(lines) + "\n"


# ============================================================================ the cascade's serving side

class CascadeRequest:
    """One cascade request as the handler sees it: a queue whose get() yields the small
    model's finished answer, or, once it escalated, the large model's outputs. `cascade`
    says which model answered, from the decision on."""

    def __init__(self, owner: AsyncCascade, rid: str, prompt: str | list[int], params: SamplingParams,
                 q: OutputQueue, stream: bool):
        self.owner, self.rid, self.prompt, self.params, self.stream = owner, rid, prompt, params, stream
        self.engine_id, self.q, self.cascade = rid, q, None

    async def get(self) -> RequestOutput:
        """The next output to show the client."""
        owner = self.owner
        while True:
            out = await self.q.get()
            if self.cascade and self.cascade["escalated"]:
                if out.finished:
                    owner.active.pop(self.rid, None)
                return out
            if not out.finished:
                continue                               # the small model's tokens are not shown
            if out.finish_reason in ("error", "abort"):
                owner.active.pop(self.rid, None)
                return out
            confidence = owner.cascade.judge(out, self.params)
            owner.num_requests += 1
            self.cascade = {"escalated": confidence < owner.cascade.threshold, "confidence": confidence}
            if not self.cascade["escalated"]:
                owner.active.pop(self.rid, None)
                # Shown at once: each sample's delta is its whole text.
                out.delta = out.text
                out.outputs = [dataclasses.replace(c, delta=c.text) for c in out.outputs]
                return out
            owner.num_escalated += 1
            # Past the waiting-queue limit too: the request was already admitted.
            seq = owner.large.check(self.prompt, self.params)
            self.q, self.engine_id = owner.large.submit(seq, self.stream), seq.request_id


class AsyncCascade:
    """The server's loop for a model cascade (--cascade-small): an AsyncEngine per model.
    A request runs on the small model first; when it finishes, Cascade.judge decides, and
    an unsure answer is submitted to the large model, whose output the client gets. The
    small model's tokens are never streamed (they may be thrown away): a streaming client
    sees the kept answer from the decision on. Looks like an AsyncEngine to the handlers."""

    def __init__(self, cascade: Cascade, max_waiting: int = 256):
        self.cascade = cascade
        self.small = AsyncEngine(cascade.small.engine, max_waiting)
        self.large = AsyncEngine(cascade.large.engine, max_waiting)
        self.num_requests = self.num_escalated = 0    # only the event loop counts
        self.active: dict[str, CascadeRequest] = {}

    def add(self, prompt: str | list[int], params: SamplingParams, fit_max_tokens: bool = False,
            stream: bool = True) -> tuple[str, int, CascadeRequest]:
        self.large.check(prompt, params, fit_max_tokens)   # the large model must be able to take it
        rid, n_prompt, q = self.small.add(prompt, self.cascade.small_params(params), fit_max_tokens,
                                          stream=False)   # judged once finished, never shown while running
        request = CascadeRequest(self, rid, prompt, params, q, stream)
        self.active[rid] = request
        return rid, n_prompt, request

    def abort(self, request_id: str) -> None:
        request = self.active.pop(request_id, None)
        if request is not None:
            (self.large if request.cascade and request.cascade["escalated"] else self.small).abort(request.engine_id)

    @property
    def errors(self) -> int:                          # failed requests, in the large model's metrics
        return self.large.errors

    @errors.setter
    def errors(self, n: int) -> None:
        self.large.errors = n

    def alive(self) -> bool:
        return self.small.alive() and self.large.alive()

    def close(self) -> None:
        self.small.close()
        self.large.close()

    def metrics_text(self) -> str:
        """The large model's metrics (nanoserve_*, as without a cascade), then the cascade's."""
        small = self.small.engine.stats()
        lines = [
            "# HELP nanoserve_cascade_requests_total Requests the small model answered or escalated.",
            "# TYPE nanoserve_cascade_requests_total counter", f"nanoserve_cascade_requests_total {self.num_requests}",
            "# HELP nanoserve_cascade_escalated_total Requests regenerated by the large model.",
            "# TYPE nanoserve_cascade_escalated_total counter", f"nanoserve_cascade_escalated_total {self.num_escalated}",
            "# TYPE nanoserve_cascade_threshold gauge", f"nanoserve_cascade_threshold {self.cascade.threshold}",
            "# HELP nanoserve_cascade_small_generation_tokens_total Tokens the small model generated.",
            "# TYPE nanoserve_cascade_small_generation_tokens_total counter",
            f"nanoserve_cascade_small_generation_tokens_total {small['generated_tokens']}"]
        return self.large.metrics_text() + "\n".join(lines) + "\n"


# ============================================================================ requests

@dataclasses.dataclass
class CompletionRequest:
    """A validated /v1/completions body."""
    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool                   # stream_options.include_usage: a last chunk with usage
    max_tokens_given: bool                # an explicit max_tokens must fit the context (else 400)
    echo: bool = False                    # the prompt (and its logprobs) before the completion


def parse_completion_request(body: dict) -> CompletionRequest:
    """OpenAI /v1/completions fields -> a CompletionRequest. Unknown fields (user, ...) are
    ignored, as OpenAI does. Raises ServingError."""
    if not isinstance(body, dict):
        raise ServingError(400, "request body must be a JSON object")
    if "prompt" not in body:
        raise ServingError(400, "missing required field 'prompt'", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                           # a batch of one
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt))):
        raise ServingError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                           "prompt")
    for name, allowed in (("suffix", (None,)),):
        if name in body and body[name] not in allowed:
            raise ServingError(400, f"'{name}' = {body[name]!r} is not supported", name)
    stream = False if body.get("stream") is None else body["stream"]       # OpenAI: null is the default
    if not isinstance(stream, bool):
        raise ServingError(400, "'stream' must be a boolean", "stream")
    if body.get("stream_options") is not None and not stream:
        raise ServingError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise ServingError(400, "'echo' must be a boolean", "echo")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ServingError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                           "stream_options")
    fields = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None,
              "stop": None, "logprobs": None, "ignore_eos": False, "presence_penalty": 0.0,
              "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": None, "n": 1, "best_of": None}
    kwargs = {}
    for name, default in fields.items():
        v = body.get(name, default)
        kwargs[name] = default if v is None and default is not None else v
    if isinstance(kwargs["logit_bias"], dict):          # JSON object keys are strings: "50256": -100
        try:
            kwargs["logit_bias"] = {int(k): v for k, v in kwargs["logit_bias"].items()}
        except ValueError:
            raise ServingError(400, "logit_bias keys must be token ids", "logit_bias") from None
    if not isinstance(kwargs["ignore_eos"], bool):
        raise ServingError(400, "'ignore_eos' must be a boolean", "ignore_eos")
    if kwargs["top_k"] == -1:                         # vLLM's spelling of "disabled"
        kwargs["top_k"] = 0
    if echo and kwargs["logprobs"] is not None:
        kwargs["prompt_logprobs"] = kwargs["logprobs"]       # echo's logprobs cover the prompt too
    try:
        params = SamplingParams(**kwargs)
    except ValueError as e:
        raise ServingError(400, str(e), str(e).split(" ")[0]) from None
    if stream and params.num_samples > params.n:
        raise ServingError(400, "best_of > n cannot be streamed (the best are known only at the end)", "best_of")
    return CompletionRequest(prompt, params, stream, stream and options.get("include_usage", False),
                             body.get("max_tokens") is not None, echo)


# OpenAI's roles. "developer" is the newer name of "system" (OpenAI's o1 and later); a
# template that does not name it gets it as "system", the role the model was trained on.
def parse_chat_messages(messages: object, keep_developer: bool = False) -> list[dict]:
    """OpenAI chat messages, checked as OpenAI checks them, -> [{role, content}] with string
    contents for the chat template. An assistant message that only calls tools (content
    null or absent, tool_calls given) renders with content "". Errors name the field as
    OpenAI does: message 'messages[1].role', param "messages.[1].role". Raises ServingError."""
    if not isinstance(messages, list) or not messages:
        raise ServingError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    clean = []
    for i, m in enumerate(messages):
        where, param = f"messages[{i}]", f"messages.[{i}]"
        if not isinstance(m, dict):
            raise ServingError(400, f"'{where}' must be an object like {{\"role\": \"user\", \"content\": \"...\"}}",
                               param)
        role = m.get("role")
        if not (isinstance(role, str) and role in CHAT_ROLES):
            raise ServingError(400, f"'{where}.role' is {'missing' if role is None else repr(role)}; "
                               f"use one of {', '.join(CHAT_ROLES)}", f"{param}.role")
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise ServingError(400, f"'{where}.{key}' must be a string", f"{param}.{key}")
        if role == "tool" and not m.get("tool_call_id"):
            raise ServingError(400, f"'{where}.tool_call_id' is required in a tool message (the call it answers)",
                               f"{param}.tool_call_id")
        if role == "function" and not m.get("name"):
            raise ServingError(400, f"'{where}.name' is required in a function message", f"{param}.name")
        calls = m.get("tool_calls")
        if calls is not None and not (role == "assistant" and isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("id"), str) and c.get("type", "function") == "function"
                and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
                and isinstance(c["function"].get("arguments"), str) for c in calls)):
            raise ServingError(400, f"'{where}.tool_calls' must be, in an assistant message, a list of "
                               "{id, type: \"function\", function: {name, arguments}} with string values",
                               f"{param}.tool_calls")
        content = m.get("content")
        if isinstance(content, list):                  # content parts: only text can be rendered
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise ServingError(400, f"'{where}.content' parts must be {{\"type\": \"text\", \"text\": ...}} "
                                   "(this server reads text only)", f"{param}.content")
            content = "".join(c["text"] for c in content)
        elif content is None and (role == "function" or (role == "assistant" and (
                calls or isinstance(m.get("function_call"), dict)))):
            content = ""                               # a message that only calls a tool
        if not isinstance(content, str):
            raise ServingError(400, f"'{where}.content' must be a string or a list of text parts"
                               + (" (or null with tool_calls)" if role == "assistant" else ""), f"{param}.content")
        if role == "developer" and not keep_developer:
            role = "system"
        clean.append({"role": role, "content": content})
    return clean


def parse_chat_request(body: object, keep_developer: bool = False) -> tuple[list, bool, CompletionRequest]:
    """OpenAI /v1/chat/completions fields -> (messages for the template, add_generation_prompt,
    a CompletionRequest whose prompt is filled in once the messages are rendered).
    max_completion_tokens is OpenAI's newer name of max_tokens; without either, the
    handler lets the answer run to the end of the context (max_tokens_given False)."""
    if not isinstance(body, dict):
        raise ServingError(400, "request body must be a JSON object")
    if "messages" not in body:
        raise ServingError(400, "missing required field 'messages'", "messages")
    messages = parse_chat_messages(body["messages"], keep_developer)
    add_generation_prompt = body.get("add_generation_prompt", True)
    if not isinstance(add_generation_prompt, bool):
        raise ServingError(400, "'add_generation_prompt' must be a boolean", "add_generation_prompt")
    logprobs, top = body.get("logprobs") or False, body.get("top_logprobs")
    if not isinstance(logprobs, bool):
        raise ServingError(400, "'logprobs' must be a boolean in the chat API (top_logprobs: how many)", "logprobs")
    if top is not None and not logprobs:
        raise ServingError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    fields = {k: body[k] for k in ("temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options",
                                   "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                                   "ignore_eos", "n", "model", "user") if k in body}
    max_name = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    if max_name is not None:
        fields["max_tokens"] = body[max_name]
    if logprobs:
        fields["logprobs"] = 0 if top is None else top
    try:
        req = parse_completion_request(dict(fields, prompt=[0]))
    except ServingError as e:
        e.param = {"logprobs": "top_logprobs", "max_tokens": max_name or "max_tokens"}.get(e.param, e.param)
        raise
    return messages, add_generation_prompt, req


# ============================================================================ responses
# OpenAI's shapes. Logprobs are given per token as text: the decoded pieces of the chosen
# tokens join to the completion's text, and top_logprobs are keyed by the text each
# alternative would have added. The engine's output processor makes those texts.

def completion_choice(op: OutputProcessor, out: RequestOutput, c: CompletionOutput, index: int, text: str,
                      params: SamplingParams, first: int = 0, echo: bool = False, prompt_chars: int = 0) -> dict:
    """One choice of a response or chunk, for sample c: `text`, and the logprobs of its
    tokens first.. (their decoded texts, which join to the text; text_offset; top_logprobs
    keyed by text). echo: the prompt and its tokens come first. prompt_chars: an echoed
    prompt's length sent in an earlier chunk (text_offset counts from the start of the echo)."""
    echoed = op.prompt_texts(out.prompt_token_ids) if echo else []
    if echo:
        text = "".join(echoed) + text
    logprobs = None
    if params.logprobs is not None and c.logprobs is not None:
        ids = c.token_ids[first:len(c.logprobs)]
        lps = c.logprobs[first:first + len(ids)]
        texts = c.token_texts[first:first + len(ids)] if c.token_texts else [op.token_text(t) for t in ids]
        prev = ([out.prompt_token_ids[-1]] + c.token_ids)[first:first + len(ids)]
        tokens, token_lps = list(texts), [d[t] for t, d in zip(ids, lps)]
        tops = [{op.text_after(p, k): v for k, v in d.items()} for p, d in zip(prev, lps)]
        if echo and out.prompt_logprobs is not None:
            p_ids = out.prompt_token_ids
            tokens = echoed + tokens
            token_lps = [None] + [out.prompt_logprobs[i][p_ids[i]] for i in range(1, len(p_ids))] + token_lps
            tops = [None] + [{op.text_after(p_ids[i - 1], k): v for k, v in out.prompt_logprobs[i].items()}
                             for i in range(1, len(p_ids))] + tops
        offsets, at = [], prompt_chars + len("".join((c.token_texts or [])[:first]))
        for t in tokens:
            offsets.append(at)
            at += len(t)
        logprobs = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason}


def chat_logprobs(op: OutputProcessor, out: RequestOutput, c: CompletionOutput, params: SamplingParams,
                  first: int = 0) -> dict | None:
    """The chat API's logprobs: per token its text, logprob, UTF-8 bytes and top alternatives."""
    if params.logprobs is None or c.logprobs is None:
        return None
    ids = c.token_ids[first:len(c.logprobs)]
    texts = c.token_texts[first:first + len(ids)] if c.token_texts else [op.token_text(t) for t in ids]
    prev = ([out.prompt_token_ids[-1]] + c.token_ids)[first:first + len(ids)]
    content = []
    for t, text, p, d in zip(ids, texts, prev, c.logprobs[first:first + len(ids)]):
        top = sorted(((op.text_after(p, k), v) for k, v in d.items()), key=lambda kv: -kv[1])[:params.logprobs]
        content.append({"token": text, "logprob": d[t], "bytes": list(text.encode("utf-8", "replace")),
                        "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode("utf-8", "replace"))}
                                         for k, v in top]})
    return {"content": content}


def chat_choice(op: OutputProcessor, out: RequestOutput, c: CompletionOutput, index: int,
                params: SamplingParams) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(op, out, c, params), "finish_reason": c.finish_reason}


def usage(n_prompt: int, out: RequestOutput) -> dict:
    generated = sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": n_prompt, "completion_tokens": generated, "total_tokens": n_prompt + generated}


def cascade_field(q: OutputQueue | CascadeRequest) -> dict:
    """Under a cascade, a response (a stream's last chunk) says which model answered."""
    return {"cascade": q.cascade} if q.cascade else {}


# ============================================================================ the app

class OpenAIServer:
    """The ASGI app around one AsyncEngine (or AsyncCascade), and the Hypercorn server
    that runs it on a socket that is already listening. serve_forever() runs it in the
    calling thread; shutdown() (from another thread) stops it; server_close() closes the
    socket and stops the engine's thread.

    With an API key, every /v1/ path wants `Authorization: Bearer KEY` (as OpenAI and
    vLLM's --api-key); /health and /metrics stay open for probes and scrapers. Every
    request gets a well-formed answer: JSON errors in OpenAI's shape for any method, path
    or body. A request reaches the engine only once its body is in, so a client that
    stalls never holds an engine slot."""

    ROUTES = {"/v1/completions": ("POST",), "/v1/chat/completions": ("POST",), "/v1/models": ("GET",),
              "/health": ("GET",), "/metrics": ("GET",)}

    def __init__(self, llm: LLM | Cascade, sock: socket.socket, model_name: str | None, max_waiting: int,
                 max_body_bytes: int, read_timeout: float, api_key: str | None, max_connections: int):
        self.socket = sock
        cascade = llm if isinstance(llm, Cascade) else None
        self.llm = cascade.large if cascade else llm                # the model the API names
        self.max_body_bytes, self.read_timeout, self.max_connections = max_body_bytes, read_timeout, max_connections
        self.api_key = None if api_key is None else api_key.encode()   # as bytes, for hmac.compare_digest
        self.model_name = model_name or Path(str(self.llm.engine.model_dir)).name
        self.async_engine = AsyncCascade(cascade, max_waiting) if cascade else AsyncEngine(llm.engine, max_waiting)
        self.in_flight = 0                            # requests being answered (the event loop counts)
        self.app = Starlette(
            routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/health", self.health, methods=["GET"]),
                    Route("/metrics", self.metrics, methods=["GET"])],
            exception_handlers={ServingError: self.serving_error, HTTPException: self.routing_error,
                                Exception: self.internal_error})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_asked, self._stopped = threading.Event(), threading.Event()
        self._stopped.set()

    @property
    def server_address(self) -> tuple:
        return self.socket.getsockname()

    # ---------------------------------------------------------------- HTTP in front of the routes

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The outermost layer: the bound on requests in flight (503 beyond it), then the
        API key (401), both before routing, so no route is shown unauthenticated."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)          # lifespan events
        if self.in_flight >= self.max_connections:
            # Retry-After as for 429: streams finish and free their places within seconds.
            return await self.refuse(ServingError(
                503, f"server busy: {self.max_connections} requests already in flight (--max-connections); "
                "retry later", kind="server_error", headers={"Retry-After": "1"}), scope, receive, send)
        path = scope["path"]
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            try:
                self.check_api_key(Headers(scope=scope))
            except ServingError as e:
                return await self.refuse(e, scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def refuse(self, e: ServingError, scope: Scope, receive: Receive, send: Send) -> None:
        await self.drain(Request(scope, receive))
        self.async_engine.errors += 1
        await error_response(e)(scope, receive, send)

    async def drain(self, request: Request) -> None:
        """Read and drop the body before an early answer, so that a keep-alive connection
        stays in step; a body too large or too slow is left unread (the connection closes)."""
        length = request.headers.get("content-length")
        if length is not None and int(length) > self.max_body_bytes:
            return

        async def read_all() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    return
        try:
            await asyncio.wait_for(read_all(), self.read_timeout)
        except (asyncio.TimeoutError, ClientDisconnect, RuntimeError):   # RuntimeError: already read
            pass

    def check_api_key(self, headers: Headers) -> None:
        """Raises ServingError(401) unless the request carries `Authorization: Bearer KEY`,
        in OpenAI's two shapes: no key (code null) or a wrong one (code "invalid_api_key")."""
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}     # what a 401 must name (RFC 9110)
        if scheme.lower() != "bearer" or not token.strip():
            raise ServingError(401, "no API key: send the header 'Authorization: Bearer KEY' "
                               "(the openai client's api_key)", headers=challenge)
        # Starlette decodes headers as Latin-1, so encoding it back gives the bytes the client
        # sent. compare_digest takes as long wherever the bytes differ: the answer's timing
        # does not tell an attacker how much of a guess was right.
        if not hmac.compare_digest(token.strip().encode("latin-1"), self.api_key):
            raise ServingError(401, "incorrect API key", headers=challenge, code="invalid_api_key")

    async def serving_error(self, request: Request, e: ServingError) -> Response:
        self.async_engine.errors += 1
        return error_response(e)

    async def routing_error(self, request: Request, e: HTTPException) -> Response:
        """Starlette's 404 (no route) and 405 (a route without this method), as OpenAI errors."""
        await self.drain(request)
        method, path = request.method, request.url.path
        if e.status_code == 405:
            allowed = ", ".join(self.ROUTES[path])
            return await self.serving_error(request, ServingError(
                405, f"{method} is not allowed on {path}; use {allowed}", kind="method_not_allowed",
                headers={"Allow": allowed}))
        return await self.serving_error(request, ServingError(e.status_code, f"no route {method} {path}",
                                                              kind="not_found_error"))

    async def internal_error(self, request: Request, e: Exception) -> Response:
        # A bug: the client gets a 500 rather than a dropped connection; Starlette then
        # re-raises, and Hypercorn logs the traceback.
        self.async_engine.errors += 1
        return error_response(ServingError(500, f"internal error: {type(e).__name__}", kind="server_error"))

    async def read_json(self, request: Request) -> object:
        """The request body (Content-Length or chunked) as JSON. Raises ServingError (4xx)
        for anything else; a 408 or 413 closes the connection (the body's rest is unread)."""
        close = {"Connection": "close"}
        length = request.headers.get("content-length")
        if length is not None and int(length) > self.max_body_bytes:      # answered from the headers alone
            raise ServingError(413, f"request body of {length} bytes exceeds {self.max_body_bytes}", headers=close)
        body = bytearray()

        async def read_all() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > self.max_body_bytes:
                    raise ServingError(413, f"request body exceeds {self.max_body_bytes} bytes", headers=close)
        try:
            await asyncio.wait_for(read_all(), self.read_timeout)
        except asyncio.TimeoutError:
            raise ServingError(408, f"the request body did not arrive within {self.read_timeout} s",
                               headers=close) from None
        except ClientDisconnect:                       # nobody to tell, but the handler must stop here
            raise ServingError(400, f"request body ended after {len(body)} bytes", headers=close) from None
        try:
            return json.loads(bytes(body) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServingError(400, f"invalid JSON: {e}") from None
        except RecursionError:
            raise ServingError(400, "invalid JSON: nested too deeply") from None

    # ---------------------------------------------------------------- routes

    async def health(self, request: Request) -> Response:
        if self.async_engine.alive():
            return json_response(200, {"status": "ok"})
        return json_response(503, {"status": "error", "message": "the engine loop is not running"})

    async def models(self, request: Request) -> Response:
        return json_response(200, {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "owned_by": "nanoserve", "created": 0,
            "max_model_len": self.llm.engine.max_model_len}]})

    async def metrics(self, request: Request) -> Response:
        return Response(self.async_engine.metrics_text(), media_type="text/plain; version=0.0.4")

    async def chat_completions(self, request: Request) -> Response:
        return await self.completions(request, chat=True)

    async def completions(self, request: Request, chat: bool = False) -> Response:
        body = await self.read_json(request)
        if chat:
            engine = self.llm.engine          # rendering only reads its tokenizer and template: safe from here
            template = engine.chat_template or ""
            messages, add_generation_prompt, req = parse_chat_request(
                body, keep_developer="'developer'" in template or '"developer"' in template)
            try:
                req.prompt = engine.chat_prompt(messages, add_generation_prompt)
            except ValueError as e:
                raise ServingError(400, str(e), "messages") from None
            if not req.max_tokens_given:
                # OpenAI and vLLM: a chat answer without max_tokens may fill the rest of the
                # context, max_model_len - prompt. A prompt that fills it all is refused by
                # the engine's own check, which names the prompt.
                room = engine.max_model_len - len(req.prompt)
                req.params = dataclasses.replace(req.params, max_tokens=max(1, room))
        else:
            req = parse_completion_request(body)
        params = req.params
        if body.get("model") not in (None, self.model_name):
            raise ServingError(404, f"model {body['model']!r} does not exist; this server has "
                               f"{self.model_name!r}", "model", "not_found_error", code="model_not_found")
        try:
            rid, n_prompt, q = self.async_engine.add(req.prompt, params, fit_max_tokens=req.max_tokens_given,
                                                      stream=req.stream)
        except ValueError as e:
            word = str(e).split(" ")[0]
            raise ServingError(400, str(e), word if word in ("max_tokens", "logit_bias") else
                               "prompt" if "prompt" in str(e) else None) from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        if req.stream:
            # Starlette's StreamingResponse watches for the client leaving and cancels the
            # stream, whose `finally` aborts the request.
            return StreamingResponse(self.events(rid, q, head, params, req.include_usage, req.echo, chat),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            out = await self.last_output(request, q)
        except ClientDisconnect:
            self.async_engine.abort(rid)               # the client went away: free its blocks
            return NoResponse()
        if out.finish_reason == "error":
            raise ServingError(500, f"the engine failed while running this request: {out.error}",
                               kind="server_error")
        op = self.llm.engine.outputs
        choices = [chat_choice(op, out, c, i, params) if chat else
                   completion_choice(op, out, c, i, c.text, params, echo=req.echo)
                   for i, c in enumerate(out.outputs)]
        return json_response(200, dict(head, choices=choices, usage=usage(n_prompt, out), **cascade_field(q)))

    @staticmethod
    async def last_output(request: Request, q: OutputQueue | CascadeRequest) -> RequestOutput:
        """The request's finished output; raises ClientDisconnect if the client leaves first
        (with the body read, the next ASGI message is the disconnect)."""
        gone = asyncio.ensure_future(request.receive())
        try:
            while True:
                get = asyncio.ensure_future(q.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise ClientDisconnect
                if get.result().finished:
                    return get.result()
        finally:
            gone.cancel()

    async def events(self, rid: str, q: OutputQueue | CascadeRequest, head: dict, params: SamplingParams,
                     include_usage: bool, echo: bool, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per step with each sample's text delta, a last chunk
        with the usage when stream_options.include_usage asked for it (as OpenAI does), then [DONE]."""
        op, n, finished = self.llm.engine.outputs, params.n, False
        sent, done, prompt_chars = [0] * n, [False] * n, [0] * n    # per sample: tokens sent, finished, echo
        try:
            if chat:                                   # the chat API opens with the role
                head = dict(head, object="chat.completion.chunk")
                first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(n)]
                yield f"data: {json.dumps(dict(head, choices=first))}\n\n"
            while not finished:
                out = await q.get()
                finished = out.finished
                if out.finish_reason == "error":       # headers are out: an error event, then [DONE]
                    self.async_engine.errors += 1
                    error = {"message": f"the engine failed while running this request: {out.error}",
                             "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                choices = []
                for i, c in enumerate(out.outputs):
                    if done[i] or (len(c.token_ids) == sent[i] and not c.finish_reason):
                        continue                       # nothing new for this sample
                    if chat:
                        choice = {"index": i, "delta": {"content": c.delta} if c.delta else {},
                                  "logprobs": chat_logprobs(op, out, c, params, sent[i]),
                                  "finish_reason": c.finish_reason}
                    else:
                        choice = completion_choice(op, out, c, i, c.delta, params, sent[i],
                                                   echo=echo and sent[i] == 0, prompt_chars=prompt_chars[i])
                        if echo and sent[i] == 0:
                            prompt_chars[i] = len(choice["text"]) - len(c.delta)
                    sent[i], done[i] = len(c.token_ids), c.finish_reason is not None
                    choices.append(choice)
                if choices:
                    extra = cascade_field(q) if finished else {}
                    yield f"data: {json.dumps(dict(head, choices=choices, **extra))}\n\n"
                if finished and include_usage:
                    yield f"data: {json.dumps(dict(head, choices=[], usage=usage(len(out.prompt_token_ids), out)))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                self.async_engine.abort(rid)           # the client went away: free its blocks

    # ---------------------------------------------------------------- running

    def serve_forever(self) -> None:
        """Serve until shutdown() is called (from another thread) or the process is interrupted."""
        self._stopped.clear()
        try:
            asyncio.run(self._serve())
        finally:
            self._stopped.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stop_asked.is_set():
            return
        config = hypercorn.config.Config()
        # Hypercorn owns (and closes) a duplicate of the socket; ours stays open for server_close.
        config.bind = [f"fd://{os.dup(self.socket.fileno())}"]
        # keep_alive_timeout also bounds the time from a connection's start to its request's
        # last header: a client that trickles its headers is dropped after it.
        config.keep_alive_timeout = self.read_timeout
        config.graceful_timeout = 1.0                 # open streams at shutdown are cut after this
        config.loglevel = "WARNING"                   # no "Running on ..." line; tracebacks of bugs stay
        await hypercorn.asyncio.serve(self.asgi, config, shutdown_trigger=self._stop.wait)

    def shutdown(self) -> None:
        """Stop serve_forever and wait until it has returned."""
        self._stop_asked.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass                                  # its loop has ended already
        self._stopped.wait(timeout=10)

    def server_close(self) -> None:
        self.socket.close()
        self.async_engine.close()


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free one). Raises OSError naming the
    address when it is taken, or not this machine's."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=1024)    # the default of 5 resets bursts of connections
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def make_server(llm: LLM | Cascade, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                max_waiting: int = 256, max_body_bytes: int = 1 << 20, read_timeout: float = 30.0,
                api_key: str | None = None, max_connections: int = 2048,
                sock: socket.socket | None = None) -> OpenAIServer:
    """Build the server, listening on host:port (or on `sock`, bound beforehand) but not yet
    answering: `.serve_forever()` runs it, `.async_engine` is its loop. Given a Cascade,
    it serves the cascade under the large model's name. read_timeout: seconds a client may
    take to send its request's headers, or its body, or stay idle between requests, before
    its connection is dropped. max_connections: requests in flight (open streams included)
    beyond which the server answers 503. api_key: the bearer token every /v1/ request must
    carry (None: no authentication)."""
    if not read_timeout > 0:
        raise ValueError(f"read_timeout must be > 0 seconds, got {read_timeout}")
    if not (isinstance(max_connections, int) and max_connections >= 1):
        raise ValueError(f"max_connections must be an integer >= 1, got {max_connections!r}")
    # A key no client could send (empty, spaces at either end, which header parsing strips,
    # control characters) would lock every client out; refused here, without echoing it.
    if api_key is not None and (not isinstance(api_key, str) or not api_key or api_key != api_key.strip()
                                or not api_key.isprintable()):
        raise ValueError("api_key must be a non-empty string of printable characters without spaces at either "
                         "end, or None to serve without one (the CLI takes it from --api-key or NANOSERVE_API_KEY)")
    return OpenAIServer(llm, sock if sock is not None else listen(host, port), model_name, max_waiting,
                        max_body_bytes, read_timeout, api_key, max_connections)
