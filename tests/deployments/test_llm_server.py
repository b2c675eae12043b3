from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.engine.protocol import GenerationRequest, InvalidRequestError, PromptTooLongError, TokenizeRequest
from deployments.engine.sampling_params import SamplingParams
from deployments.llm_server import INLINE_ENCODE_CHARS, LLMServer
from deployments.model_registry import ModelConfig


def tiny_server(context_length: int = 512) -> LLMServer:
    return LLMServer(ModelConfig(name="tiny", source={"kind": "tiny_random"}, context_length=context_length, torch_threads=1))


def turn(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def decoded(server: LLMServer, ids: list[int]) -> str:
    return server.loaded.tokenizer.decode(ids)


@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_a_new_server_has_answered_once_through_its_chat_template_and_counts_no_request(engine):
    server = LLMServer(ModelConfig(name="tiny", source={"kind": "tiny_random"}, engine=engine, torch_threads=1))
    assert server.engine.stats().total_requests == 1  # the warm-up, through the engine
    assert server.stats().total_requests == 0 and server.engine.stats().active_requests == 0


def test_a_context_too_short_for_the_warm_up_still_starts_and_answers_what_fits():
    server = tiny_server(context_length=4)
    assert server.engine.stats().total_requests == 0 and server.stats().total_requests == 0

    async def answer() -> list[str]:
        request = GenerationRequest(prompt="ab", params=SamplingParams(max_tokens=2, ignore_eos=True))
        return [output.text async for output in server.generate(request)]

    assert asyncio.run(answer())


def test_prompt_uses_the_chat_template_with_all_turns_when_they_fit():
    server = tiny_server()
    messages = turn("first", "one") + [{"role": "user", "content": "second"}]
    text = decoded(server, server.encode_chat(messages, max_tokens=16))
    assert text == (
        "<|im_start|>user\nfirst<|im_end|>\n<|im_start|>assistant\none<|im_end|>\n"
        "<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n"
    )


def test_oldest_turns_are_dropped_first_and_the_system_message_is_kept():
    # Byte-level tokenizer: every character is a token, so lengths are easy to reason about.
    server = tiny_server(context_length=160)
    messages = [{"role": "system", "content": "Be brief."}] + turn("a" * 40, "b" * 40) + turn("c" * 10, "d" * 10)
    messages.append({"role": "user", "content": "latest"})
    ids = server.encode_chat(messages, max_tokens=40)
    text = decoded(server, ids)
    assert len(ids) <= 160 - 40
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "a" * 40 not in text and "b" * 40 not in text  # oldest turn gone
    assert "c" * 10 in text and "d" * 10 in text and "latest" in text


def test_thousands_of_turns_are_cut_to_the_latest_that_fit_in_a_few_renders(monkeypatch):
    # Dropping one turn per render rendered this body 50,000 times (minutes, the replica's loop blocked).
    server = tiny_server(context_length=512)
    tokenizer = server.loaded.tokenizer
    render, renders = tokenizer.apply_chat_template, []

    def counted_render(messages, **kwargs):
        renders.append(len(messages))
        assert len(renders) <= 12, "rendered once per dropped turn"
        return render(messages, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", counted_render)
    messages = [{"role": "user", "content": str(i % 10)} for i in range(50_000)]
    ids = server.encode_chat(messages, max_tokens=16)
    assert max(renders) <= 512 - 16
    text = decoded(server, ids)
    assert text.endswith("<|im_start|>user\n9<|im_end|>\n<|im_start|>assistant\n")
    # The latest turns that fit, all of them: one more would not.
    one_more = render(messages[-text.count("<|im_start|>user") - 1 :], add_generation_prompt=True, tokenize=False)
    assert len(ids) <= 512 - 16 < len(tokenizer(one_more)["input_ids"])


def test_a_prompt_that_cannot_fit_is_rejected_with_the_numbers():
    server = tiny_server(context_length=64)
    with pytest.raises(PromptTooLongError, match="has a context of 64 tokens and 16 are reserved"):
        server.encode_chat([{"role": "user", "content": "x" * 100}], max_tokens=16)


async def collect(server: LLMServer, request: GenerationRequest):
    return [output async for output in server.generate(request)]


async def test_generate_streams_and_counts_tokens():
    server = tiny_server()
    params = SamplingParams(max_tokens=12, temperature=0, min_tokens=12)
    outputs = await collect(server, GenerationRequest(messages=[{"role": "user", "content": "hello"}], params=params))
    *pieces, last = outputs
    assert last.finish_reason == "length" and last.completion_tokens == 12
    assert last.prompt_tokens == len(server.encode_chat([{"role": "user", "content": "hello"}], 12))
    # The first token comes alone; the tiny model's next ones may come coalesced.
    assert pieces and pieces[0].completion_tokens == 1
    assert all(o.finish_reason is None for o in pieces)


async def test_an_answer_left_unbounded_keeps_its_reserve_when_fitted_and_runs_until_the_context_ends():
    server = tiny_server(context_length=160)  # byte-level tokenizer: a character is a token
    long_chat = turn("a" * 40, "b" * 40) + [{"role": "user", "content": "c" * 20}]
    unbounded = SamplingParams(max_tokens=8192, reserve_tokens=40, temperature=0, ignore_eos=True)
    outputs = await collect(server, GenerationRequest(messages=long_chat, params=unbounded))
    # The oldest turn was dropped to leave 40 tokens (not 8,192: no prompt could fit that), and
    # the answer went on past those 40 to the end of the context.
    assert outputs[-1].prompt_tokens == len(server.encode_chat(long_chat, 40)) <= 120
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].prompt_tokens + outputs[-1].completion_tokens == 160
    with pytest.raises(PromptTooLongError, match="has a context of 160 tokens and 8192 are reserved"):
        await collect(server, GenerationRequest(messages=long_chat, params=SamplingParams(max_tokens=8192)))


async def test_seeded_sampling_repeats_and_greedy_is_deterministic():
    server = tiny_server()
    messages = [{"role": "user", "content": "hello"}]

    async def text(params):
        return "".join(o.text for o in await collect(server, GenerationRequest(messages=messages, params=params)))

    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=5, min_tokens=10)
    assert await text(seeded) == await text(seeded)
    greedy = SamplingParams(max_tokens=10, temperature=0, min_tokens=10)
    assert await text(greedy) == await text(greedy)


async def test_closing_the_stream_cancels_generation_and_frees_the_engine():
    server = tiny_server()
    params = SamplingParams(max_tokens=400, temperature=0, min_tokens=400)
    stream = server.generate(GenerationRequest(messages=[{"role": "user", "content": "hello"}], params=params))
    await stream.__anext__()
    await stream.aclose()
    for _ in range(100):
        if server.stats().active_requests == 0:
            break
        await asyncio.sleep(0.05)
    assert server.stats().active_requests == 0
    # The engine is free again: a new request completes.
    outputs = await collect(
        server,
        GenerationRequest(
            messages=[{"role": "user", "content": "hi"}], params=SamplingParams(max_tokens=3, temperature=0, min_tokens=3)
        ),
    )
    assert outputs[-1].completion_tokens == 3


async def test_the_batched_engine_server_lets_transformers_weights_go():
    server = tiny_server()
    assert server.loaded.model is None  # the engine holds its own copy
    outputs = await collect(server, GenerationRequest(prompt="hi", params=SamplingParams(max_tokens=3, min_tokens=3)))
    assert outputs[-1].completion_tokens == 3


async def test_chunk_rates_from_the_config_reach_the_engine():
    config = ModelConfig(
        name="tiny", source={"kind": "tiny_random"}, torch_threads=1, stream_chunks_per_s=1e9, replica_chunks_per_s=1e9
    )
    server = LLMServer(config)
    params = SamplingParams(max_tokens=12, min_tokens=12, temperature=0)
    outputs = await collect(server, GenerationRequest(prompt="hi", params=params))
    assert [o.completion_tokens for o in outputs] == list(range(1, 13))  # no coalescing: a chunk per token


def test_the_schedulers_settings_from_the_config_reach_the_engine():
    config = ModelConfig(name="tiny", source={"kind": "tiny_random"}, torch_threads=1)
    default = LLMServer(config).engine.scheduler
    chosen = LLMServer(config.model_copy(update={"prefill_chunk_tokens": 8, "newcomers_first": False})).engine.scheduler
    # The CPU's defaults: 256 prompt tokens a step, newcomers' prompts first.
    assert (default.prefill_chunk_tokens, default.newcomers_first) == (256, True)
    assert (chosen.prefill_chunk_tokens, chosen.newcomers_first) == (8, False)


async def test_the_event_loop_keeps_running_while_a_long_prompt_is_encoded(monkeypatch):
    # The encoding waits for a coroutine on the replica's loop: on the loop's own thread it would
    # wait in vain (the loop, and every other request on it, blocked) until its timeout.
    server = tiny_server()
    loop_ran = threading.Event()
    encode_prompt = server.encode_prompt

    def slow_encode_prompt(prompt: str, max_tokens: int) -> list[int]:
        assert loop_ran.wait(timeout=5), "the event loop was blocked while the prompt was encoded"
        return encode_prompt("hello", max_tokens)

    async def meanwhile_on_the_loop() -> None:
        await asyncio.sleep(0.05)
        loop_ran.set()

    monkeypatch.setattr(server, "encode_prompt", slow_encode_prompt)
    long_prompt = "x" * (INLINE_ENCODE_CHARS + 1)
    request = GenerationRequest(params=SamplingParams(max_tokens=3, min_tokens=3, temperature=0), prompt=long_prompt)
    outputs, _ = await asyncio.gather(collect(server, request), meanwhile_on_the_loop())
    assert outputs[-1].completion_tokens == 3


async def test_short_prompts_are_encoded_on_the_loop_unless_a_long_one_is_being_encoded(monkeypatch):
    server = tiny_server()
    encoded_on: list[tuple[str, str]] = []
    long_started, encode_prompt = threading.Event(), server.encode_prompt

    def recording_encode_prompt(prompt: str, max_tokens: int) -> list[int]:
        encoded_on.append((prompt[:5], threading.current_thread().name))
        if len(prompt) > INLINE_ENCODE_CHARS:
            long_started.set()
            threading.Event().wait(0.2)  # still encoding when the short one comes
        return encode_prompt("hello", max_tokens)

    monkeypatch.setattr(server, "encode_prompt", recording_encode_prompt)
    params = SamplingParams(max_tokens=2, min_tokens=2, temperature=0)

    async def short_once_the_long_one_encodes() -> list:
        await asyncio.to_thread(long_started.wait, 5)
        return await collect(server, GenerationRequest(params=params, prompt="short"))

    await collect(server, GenerationRequest(params=params, prompt="alone"))
    await asyncio.gather(
        collect(server, GenerationRequest(params=params, prompt="y" * (INLINE_ENCODE_CHARS + 1))),
        short_once_the_long_one_encodes(),
    )
    loop_thread = threading.current_thread().name
    assert encoded_on[0] == ("alone", loop_thread)
    assert encoded_on[1][0] == "yyyyy" and encoded_on[1][1].startswith("encode-prompt")
    # While the encoder thread tokenizes, a short prompt waits for it there: never two threads in the tokenizer.
    assert encoded_on[2][0] == "short" and encoded_on[2][1].startswith("encode-prompt")


def test_a_count_is_what_a_generation_encodes_and_tools_reach_a_template_without_them_as_text():
    server = tiny_server()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for offered in (None, tools):
        tokens, context = server.tokenize(TokenizeRequest(messages=messages, tools=offered))
        assert tokens == server.encode_chat(messages, 16, offered) and context == 512
    with_tools = decoded(server, server.tokenize(TokenizeRequest(messages=messages, tools=tools))[0])
    assert "Be brief." in with_tools and '"name": "get_weather"' in with_tools and "<tool_call>" in with_tools
    prompt, _ = server.tokenize(TokenizeRequest(prompt="Paris is", add_special_tokens=True))
    assert prompt == server.encode_prompt("Paris is", 16) and server.detokenize(prompt) == "Paris is"
    with pytest.raises(InvalidRequestError, match="tokens: 100000 is not among"):
        server.detokenize([1, 100000])
