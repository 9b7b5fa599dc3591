"""/v1/chat/completions and LLM.chat: real chat templates (Llama-2-chat's [INST], ChatML),
rendered as transformers renders them, checked with the real `openai` client."""

import json
import threading

import pytest

import nanoserve
from nanoserve import LLM, SamplingParams
from server import make_server, parse_chat_messages
from conftest import LLAMA2_TOKENIZER, TINY_CONFIG, needs_llama2_tokenizer, write_random_checkpoint

openai = pytest.importorskip("openai")

# The chat templates these families publish in tokenizer_config.json.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 3"}]


@pytest.fixture(scope="module")
def llama2_chat(tmp_path_factory):
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip("../shared/models/tokenizers/llama2/tokenizer.model is not beside this checkout")
    d = write_random_checkpoint(tmp_path_factory.mktemp("l2chat") / "m", dict(
        TINY_CONFIG, vocab_size=32000, hidden_size=32, num_attention_heads=4, num_key_value_heads=2))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA2_CHAT_TEMPLATE,
                                                         "bos_token": "<s>", "eos_token": "</s>"}))
    return LLM(d, device="cpu", tokenizer=LLAMA2_TOKENIZER, max_model_len=256)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = write_random_checkpoint(tmp_path_factory.mktemp("chatml") / "m", dict(TINY_CONFIG, vocab_size=400))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["system user assistant You are a helpful assistant. Count to 3 Hello."] * 30, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>",
                                                         "bos_token": None, "add_bos_token": False}))
    return LLM(d, device="cpu", max_model_len=256)


@needs_llama2_tokenizer
def test_llama2_chat_template_renders_as_transformers_does(llama2_chat):
    eng = llama2_chat.engine
    sp = eng.tokenizer.sp
    ids = eng.chat_prompt(CONVERSATION)
    # <s>[INST] <<SYS>>\n...\n<</SYS>>\n\nHi there [/INST] Hello. </s><s>[INST] Count to 3 [/INST]
    expected = ([1] + sp.encode("[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello. ") + [2]
                + [1] + sp.encode("[INST] Count to 3 [/INST]"))
    assert ids == expected and ids.count(1) == 2                # BOS tokens, not "<s>" spelled out
    with pytest.raises(ValueError, match="alternate"):          # the template's own raise_exception
        eng.chat_prompt([{"role": "assistant", "content": "x"}])


def test_chatml_template_renders_special_tokens_and_the_generation_prompt(chatml):
    eng = chatml.engine
    t = eng.tokenizer.tok
    ids = eng.chat_prompt(CONVERSATION[1:2])
    text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    assert ids == t.encode(text + "<|im_start|>assistant\n", add_special_tokens=False).ids
    assert ids.count(t.token_to_id("<|im_start|>")) == 3
    assert eng.chat_prompt(CONVERSATION[1:2], add_generation_prompt=False) == \
        t.encode(text, add_special_tokens=False).ids
    out = chatml.chat(CONVERSATION[1:2], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.prompt_token_ids == ids and len(out.token_ids) == 5


@pytest.mark.parametrize("role", ["wizard", "", None, 7])
def test_the_python_api_refuses_a_role_openai_does_not_have(chatml, role):
    with pytest.raises(ValueError, match=r"messages\[1\] must be an object with a role among"):
        chatml.chat([{"role": "system", "content": "Be brief."}, {"role": role, "content": "Hi"}])


def test_models_without_a_template_use_the_documented_default(tmp_path):
    if not (nanoserve.DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("the bundled model is not in this checkout")
    llm = LLM(nanoserve.DEFAULT_MODEL, device="cpu")
    ids = llm.engine.chat_prompt([{"role": "user", "content": "sort a list"}])
    assert llm.tokenizer.decode(ids) == "# user:\nsort a list\n# assistant:\n" and ids[0] == llm.tokenizer.bos_id


def serve(llm):
    server = make_server(llm, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="none",
                           max_retries=0)
    return server, client


@pytest.mark.parametrize("which", ["llama2_chat", "chatml"])
def test_openai_client_chat_completions_plain_and_streamed(request, which):
    llm = request.getfixturevalue(which)
    ids = llm.engine.chat_prompt(CONVERSATION)
    ref = llm.generate(ids, SamplingParams(temperature=0, max_tokens=8))[0]    # before the server owns the engine
    server, client = serve(llm)
    try:
        kw = dict(model=server.model_name, messages=CONVERSATION, max_completion_tokens=8, temperature=0, seed=3)
        r = client.chat.completions.create(logprobs=True, top_logprobs=2, **kw)
        choice = r.choices[0]
        assert r.object == "chat.completion" and choice.message.role == "assistant"
        assert choice.message.content == ref.text and choice.finish_reason == ref.finish_reason
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
        lp = choice.logprobs.content
        assert len(lp) == len(ref.token_ids) and all(len(x.top_logprobs) == 2 for x in lp)
        assert lp[0].top_logprobs[0].logprob == pytest.approx(lp[0].logprob)     # greedy: the top one
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
        stopped = client.chat.completions.create(model=server.model_name, messages=CONVERSATION, max_tokens=30,
                                                 temperature=0.9, seed=1, stop=[" "])
        assert " " not in stopped.choices[0].message.content
    finally:
        server.shutdown()
        server.server_close()


def test_bad_chat_requests_get_400s_naming_the_field(chatml):
    server, client = serve(chatml)
    try:
        for kw, param in ((dict(messages="hi"), "messages"), (dict(messages=[{"content": "x"}]), "messages.[0].role"),
                          (dict(messages=CONVERSATION, logprobs="yes"), "logprobs"),
                          (dict(messages=CONVERSATION, top_logprobs=2), "top_logprobs"),
                          (dict(messages=CONVERSATION, logprobs=True, top_logprobs=50), "top_logprobs"),
                          (dict(messages=CONVERSATION, n=0), "n"),
                          (dict(messages=CONVERSATION, max_tokens=10_000), "max_tokens")):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=server.model_name, **kw)
            assert e.value.body["param"] == param, kw
    finally:
        server.shutdown()
        server.server_close()


def test_openai_client_against_the_cli_server():
    """`python nanoserve.py --serve` as a user starts it (its API key in NANOSERVE_API_KEY),
    the bundled model, the real client."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from conftest import ROOT
    if not (nanoserve.DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip("the bundled model is not in this checkout")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "nanoserve.py"), "--serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, NANOSERVE_API_KEY="sk-from-env"))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-from-env", max_retries=0,
                               timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
                time.sleep(0.2)
        name = models.data[0].id
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "sort a list"}],
                                              max_tokens=12, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "sort a list"}], max_tokens=12, temperature=0,
            stream=True))
        assert text == chat.choices[0].message.content
        done = client.completions.create(model=name, prompt="def add(a, b):", max_tokens=8, n=2, temperature=0.8,
                                         seed=1, presence_penalty=0.5, logit_bias={"3": -100}, logprobs=1, echo=True)
        assert len(done.choices) == 2 and all(c.text.startswith("def add(a, b):") for c in done.choices)
        stranger = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def chatml_served(chatml):
    server, client = serve(chatml)
    yield server, client, chatml
    server.shutdown()
    server.server_close()


def test_chat_without_max_tokens_runs_to_the_end_of_the_context_and_completions_default_to_16(chatml_served):
    server, client, llm = chatml_served
    kw = dict(model=server.model_name, messages=CONVERSATION[1:2], temperature=0.8, seed=1,
              extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 256            # max_model_len
    assert r.choices[0].finish_reason == "length"
    assert client.chat.completions.create(max_completion_tokens=5, **kw).usage.completion_tokens == 5
    assert client.chat.completions.create(max_tokens=4, **kw).usage.completion_tokens == 4
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:                           # no room left: the prompt is named
        client.chat.completions.create(model=server.model_name,
                                       messages=[{"role": "user", "content": "Hello. " * 300}])
    assert e.value.body["param"] == "prompt" and "max_model_len is 256" in e.value.body["message"]
    done = client.completions.create(model=server.model_name, prompt="Hello", extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 16                                   # OpenAI's default


@pytest.mark.parametrize("role", ["wizard", "", "System", 5, None])
def test_unknown_or_empty_roles_are_400s_naming_the_field(chatml_served, role):
    server, client, _ = chatml_served
    messages = [{"role": "user", "content": "Hi"}, {"role": role, "content": "Hello."}]
    if role is None:
        del messages[1]["role"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=2)
    assert e.value.body["param"] == "messages.[1].role" and "messages[1].role" in e.value.body["message"]
    assert e.value.code is None


def test_developer_messages_render_as_system_unless_the_template_names_them(chatml_served):
    server, client, llm = chatml_served
    kw = dict(model=server.model_name, max_tokens=6, temperature=0)
    as_system = client.chat.completions.create(messages=CONVERSATION, **kw)
    developer = [dict(CONVERSATION[0], role="developer")] + CONVERSATION[1:]
    as_developer = client.chat.completions.create(messages=developer, **kw)
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    # ChatML's template adds its own system message when the first one is not "system":
    # a developer message passed through unchanged would have made the prompt longer.
    assert llm.engine.chat_prompt(developer) != llm.engine.chat_prompt(CONVERSATION)
    assert parse_chat_messages(developer, keep_developer=True)[0]["role"] == "developer"


def test_assistant_tool_calls_with_null_content_are_accepted_and_render_as_empty(chatml_served):
    server, client, llm = chatml_served
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [{"role": "user", "content": "Add 1 and 2"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"}, {"role": "user", "content": "Thanks"}]
    r = client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=3)
    rendered = [dict(m, content=m["content"] or "") for m in messages]
    assert r.usage.prompt_tokens == len(llm.engine.chat_prompt(rendered)) and r.usage.completion_tokens == 3
    for bad, param in (({"role": "assistant", "content": None}, "messages.[1].content"),    # no tool_calls
                       ({"role": "assistant", "content": None, "tool_calls": [{"id": 1}]}, "messages.[1].tool_calls"),
                       ({"role": "tool", "content": "3"}, "messages.[1].tool_call_id"),
                       ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                        "messages.[1].content")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=server.model_name, messages=[messages[0], bad], max_tokens=2)
        assert e.value.body["param"] == param, bad


def test_stream_options_without_stream_is_a_400(chatml_served):
    server, client, _ = chatml_served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model_name, messages=CONVERSATION, max_tokens=2,
                                       stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options" and "'stream'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model_name, prompt="Hello", max_tokens=2, stream=False,
                                  stream_options={"include_usage": True})
    assert e.value.body["param"] == "stream_options"
    ok = client.chat.completions.create(model=server.model_name, messages=CONVERSATION, max_tokens=2,
                                        stream_options=None)
    assert ok.usage.completion_tokens == 2
