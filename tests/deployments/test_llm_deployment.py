"""The model deployment's class without Ray, on real TCP connections on 127.0.0.1: an ingress
replica's generations over the call channel (`CallClient`, as for a model of one replica), their
outputs over the output channel to a real inbox, cancellation, the goodbye as it stops."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from deployments.call_channel import CallClient
from deployments.engine.protocol import GenerationRequest, PromptTooLongError
from deployments.engine.sampling_params import SamplingParams
from deployments.llm_deployment import LLMDeployment
from deployments.model_registry import ModelConfig
from deployments.output_channel import Inbox


class ReplicaHandle:
    """The deployment's Serve handle over the one replica in-process; records what it is asked."""

    def __init__(self, replica: Any):
        self.replica = replica
        self.called: list[str] = []

    def __getattr__(self, name: str) -> SimpleNamespace:
        async def remote(*args: Any, **kwargs: Any) -> Any:
            self.called.append(name)
            answer = getattr(self.replica, name)(*args, **kwargs)
            return await answer if asyncio.iscoroutine(answer) else answer

        return SimpleNamespace(remote=remote)


@pytest.fixture(scope="module")
def replica():
    config = ModelConfig(name="tiny", source={"kind": "tiny_random"}, context_length=32768, torch_threads=1)
    return LLMDeployment.func_or_class(config, None)


async def test_generations_go_over_the_channel_answer_as_the_server_does_and_stop_when_cancelled(replica, monkeypatch):
    monkeypatch.setattr("ray.util.get_node_ip_address", lambda: "127.0.0.1")
    handle = ReplicaHandle(replica)
    client = CallClient(handle, "model 'tiny'")
    assert await client.opened()
    inbox = Inbox()
    await inbox.start("127.0.0.1")
    greedy = GenerationRequest(prompt="count", params=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))

    stream = inbox.stream(lambda reply_to: client.generate.remote(dataclasses.replace(greedy, reply_to=reply_to)))
    outputs = [output async for output in stream]
    expected = [output async for output in replica.server.generate(greedy)]
    assert "".join(o.text for o in outputs) == "".join(o.text for o in expected)
    assert (outputs[-1].finish_reason, outputs[-1].completion_tokens) == ("length", 12)
    assert handle.called == ["address"]  # nothing went through Serve

    # The replica's errors come back with their types; a cancelled generation stops in the engine.
    too_long = dataclasses.replace(greedy, prompt="x" * 33_000)  # a token a byte
    with pytest.raises(PromptTooLongError):
        await anext(inbox.stream(lambda reply_to: client.generate.remote(dataclasses.replace(too_long, reply_to=reply_to))))
    endless = dataclasses.replace(greedy, params=SamplingParams(max_tokens=32_000, ignore_eos=True))  # many seconds
    stream = inbox.stream(lambda reply_to: client.generate.remote(dataclasses.replace(endless, reply_to=reply_to)))
    await anext(stream)
    assert replica.stats().active_requests == 1
    stream.cancel()
    async with asyncio.timeout(2):
        while replica.stats().active_requests:
            await asyncio.sleep(0.01)

    # Stopping, the replica says goodbye: the next generation goes through Serve's handle.
    await asyncio.wait_for(replica.__del__(), 5)
    stream = inbox.stream(lambda reply_to: client.generate.remote(dataclasses.replace(greedy, reply_to=reply_to)))
    assert "".join([output.text async for output in stream]) == "".join(o.text for o in expected)
    assert handle.called[1:] == ["generate"]
    client.close()
    await inbox.stop()
