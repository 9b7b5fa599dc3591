"""Tokenizer and streaming detokenization with the real Llama 2 sentencepiece model."""

import dataclasses

import pytest

import nanoserve
from nanoserve import LLM, SamplingParams
from conftest import LLAMA2_TOKENIZER, TINY_CONFIG, needs_llama2_tokenizer, write_random_checkpoint

TEXTS = [
    "Hello world",
    "  leading spaces and\n\nnewlines\n",
    "emoji 😀🎉 👩‍👩‍👧 in a row",
    "CJK 世界你好，日本語のテキスト",
    "accents: café naïve Ångström façade",
    "\ttabs\tand mixed 🙂 é 中",
]


@pytest.fixture(scope="module")
def tok():
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip("../shared/models/tokenizers/llama2/tokenizer.model is not beside this checkout")
    return nanoserve.Tokenizer(LLAMA2_TOKENIZER)


@needs_llama2_tokenizer
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == text


@needs_llama2_tokenizer
@pytest.mark.parametrize("prompt", ["Say:", "Say: ", "x😀"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_never_splits_a_character_and_concatenates_to_the_decode(tok, prompt, text):
    p = tok.encode(prompt)
    gen = tok.sp.encode(text)                    # the "generated" tokens, one at a time
    detok = nanoserve.IncrementalDetokenizer(tok, p)
    deltas = [detok.step(t) for t in gen]
    deltas.append(detok.step(-1, final=True))
    assert all("\ufffd" not in d for d in deltas)
    full = tok.decode(p + gen)
    assert "".join(deltas) == full[len(tok.decode(p)):]
    # Byte-fallback pieces were exercised where the text has rare characters.
    if "😀" in text:
        assert any(tok.sp.id_to_piece(t).startswith("<0x") for t in gen)


@needs_llama2_tokenizer
def test_leading_space_of_first_generated_token(tok):
    detok = nanoserve.IncrementalDetokenizer(tok, tok.encode("Hello"))
    assert detok.step(tok.sp.piece_to_id("▁world")) == " world"


@needs_llama2_tokenizer
def test_engine_stream_equals_final_text(tmp_path):
    cfg = dict(TINY_CONFIG, vocab_size=32000, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    d = write_random_checkpoint(tmp_path / "m", cfg)
    llm = LLM(d, device="cpu", tokenizer=LLAMA2_TOKENIZER)
    prompts = ["The café 😀", "世界", "  indented\n"]
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=0, ignore_eos=True)
    streamed = {}
    finals = {}
    for out in llm.stream(prompts, params):
        streamed[out.request_id] = streamed.get(out.request_id, "") + out.delta
        if out.finished:
            finals[out.request_id] = out
    assert len(finals) == 3
    tok = llm.tokenizer
    for rid, out in finals.items():
        assert streamed[rid] == out.text
        whole = tok.decode(out.prompt_token_ids + out.token_ids)
        assert out.text == whole[len(tok.decode(out.prompt_token_ids)):]


@needs_llama2_tokenizer
def test_outputs_cost_what_is_asked(tmp_path):
    """A request that does not stream gets one RequestOutput, when it finishes, and without
    stop strings its text is made only then (no decode call before); with stop strings its
    text grows every step, still without outputs; a streamed twin gets an output every step.
    All three end with the same tokens, text and token texts (same seed)."""
    cfg = dict(TINY_CONFIG, vocab_size=32000, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    eng = LLM(write_random_checkpoint(tmp_path / "m", cfg), device="cpu", tokenizer=LLAMA2_TOKENIZER).engine
    calls = []
    decode = eng.tokenizer.decode
    eng.tokenizer.decode = lambda ids: calls.append(ids) or decode(ids)
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=3, ignore_eos=True)
    runs = {}
    for name, stream, stop in (("streamed", True, None), ("quiet", False, None), ("stops", False, ["@@@@"])):
        eng.add_request("The café", dataclasses.replace(params, stop=stop), stream=stream)
        per_step = []                                   # (outputs, decode calls) of each step
        while eng.has_unfinished():
            calls.clear()
            outs = eng.step()
            per_step.append((outs, len(calls)))
        runs[name] = per_step
    assert len(runs["streamed"]) == 12 and all(len(outs) == 1 for outs, _ in runs["streamed"])
    for name in ("quiet", "stops"):
        assert [len(outs) for outs, _ in runs[name]] == [0] * 11 + [1]
    assert all(n == 0 for _, n in runs["quiet"][:-1]) and runs["quiet"][-1][1] > 0
    assert all(n > 0 for _, n in runs["stops"])
    last = {name: per_step[-1][0][0] for name, per_step in runs.items()}
    assert "".join(outs[0].delta for outs, _ in runs["streamed"]) == last["streamed"].text
    for name in ("quiet", "stops"):
        assert last[name].finished and last[name].delta == last[name].text
        for field in ("token_ids", "text", "token_texts", "finish_reason"):
            assert getattr(last[name], field) == getattr(last["streamed"], field)


@needs_llama2_tokenizer
def test_stop_strings_end_generation_and_are_not_returned(tmp_path):
    cfg = dict(TINY_CONFIG, vocab_size=32000, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    d = write_random_checkpoint(tmp_path / "m", cfg)
    llm = LLM(d, device="cpu", tokenizer=LLAMA2_TOKENIZER)
    free = llm.generate("Once", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    stop = free.text[8:11]                              # a string the model will produce
    assert len(stop) == 3
    streamed = ""
    for out in llm.stream("Once", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])):
        streamed += out.delta
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.find(stop)] == streamed
