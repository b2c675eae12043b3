"""The scheduler alone, without a model: which requests get which cache rows, which prompt
tokens a step computes and which it copies from another row."""

from __future__ import annotations

from deployments.engine.forward import PromptChunk
from deployments.engine.sampler import SlotSampling
from deployments.engine.sampling_params import SamplingParams
from deployments.engine.scheduler import PrefixCopy, Scheduler
from deployments.engine.sequence import Sequence


def request(prompt: list[int], **params) -> Sequence:
    """A request as the engine queues it; the scheduler reads its prompt, parameters and state
    only (its queue and text stages belong to the engine and the output stage)."""
    sampling = SamplingParams(**params)
    return Sequence(
        prompt_ids=prompt,
        params=sampling,
        loop=None,  # type: ignore[arg-type]
        outputs=None,  # type: ignore[arg-type]
        posts=None,  # type: ignore[arg-type]
        detokenizer=None,  # type: ignore[arg-type]
        stop_matcher=None,  # type: ignore[arg-type]
        sampling=SlotSampling.entry(-1, sampling, 0, len(prompt)),
    )


def queued(scheduler: Scheduler, *requests: Sequence) -> list[Sequence]:
    scheduler.waiting.extend(requests)
    return scheduler.admit()


def run_prompt(scheduler: Scheduler, seq: Sequence, generated: list[int]) -> None:
    """Plans steps until `seq` is prefilled, then gives it `generated` tokens (as the engine would)."""
    while not seq.is_prefilled:
        scheduler.plan()
    seq.generated += generated


def test_requests_get_free_rows_in_arrival_order_and_the_rest_wait():
    scheduler = Scheduler(max_batch_size=2, prefill_chunk_tokens=64, prefix_caching=False)
    first, cancelled, second, third = (request([i + 1, 9]) for i in range(4))
    cancelled.is_cancelled = True
    assert queued(scheduler, first, cancelled, second, third) == [first, second]
    assert (first.slot, second.slot) == (0, 1) and list(scheduler.waiting) == [third]
    scheduler.free(first)
    assert scheduler.admit() == [third] and third.slot == 0
    assert scheduler.active == 2


def test_a_step_decodes_every_running_request_and_shares_its_token_budget_among_new_prompts():
    scheduler = Scheduler(max_batch_size=4, prefill_chunk_tokens=8, prefix_caching=False)
    running = request([1, 2, 3])
    queued(scheduler, running)
    run_prompt(scheduler, running, [4])
    a, b = request([10] * 6), request([20] * 6)
    queued(scheduler, a, b)
    plan = scheduler.plan()
    assert plan.decode == [running]
    assert [chunk for chunk, _ in plan.chunks] == [PromptChunk(a.slot, 0, 6, True), PromptChunk(b.slot, 0, 2, False)]
    assert plan.sampled == [running, a] and plan.completing == [a]
    plan = scheduler.plan()  # b goes on where it stopped
    assert [chunk for chunk, _ in plan.chunks] == [PromptChunk(b.slot, 2, 4, True)]
    assert plan.decode == [running, a]


def test_a_prompt_copies_the_prefix_a_running_request_holds_and_computes_the_rest():
    scheduler = Scheduler(max_batch_size=4, prefill_chunk_tokens=64, prefix_caching=True)
    system = [7] * 10
    first = request(system + [1, 2])
    queued(scheduler, first)
    run_prompt(scheduler, first, [3, 4])
    second = request(system + [5, 6])
    queued(scheduler, second)
    plan = scheduler.plan()
    assert plan.copies == [PrefixCopy(first.slot, second.slot, 0, 10)]
    assert [chunk for chunk, _ in plan.chunks] == [PromptChunk(second.slot, 10, 2, True)]
    assert scheduler.reused_prompt_tokens == 10


def test_a_conversations_next_turn_takes_the_row_its_last_turn_left():
    scheduler = Scheduler(max_batch_size=3, prefill_chunk_tokens=64, prefix_caching=True)
    turn = request([1, 2, 3, 4])
    other = request([9, 9])
    queued(scheduler, turn, other)
    run_prompt(scheduler, turn, [5, 6])
    scheduler.free(turn)  # its row keeps prompt and answer but the newest token: 1..5
    next_turn = request([1, 2, 3, 4, 5, 6, 7, 8])
    stranger = request([8, 8, 8])
    assert queued(scheduler, stranger, next_turn) == [stranger, next_turn]
    assert stranger.slot == 2  # an empty row first, the leftover kept for whoever continues it
    assert next_turn.slot == turn.slot and next_turn.n_prefilled == 5


def test_a_scored_prompt_is_computed_whole_and_its_chunks_are_scored():
    scheduler = Scheduler(max_batch_size=3, prefill_chunk_tokens=4, prefix_caching=True)
    first = request([1, 2, 3, 4, 5, 6])
    queued(scheduler, first)
    run_prompt(scheduler, first, [7])
    scheduler.free(first)
    again = request([1, 2, 3, 4, 5, 6], prompt_logprobs=1)
    queued(scheduler, again)
    assert again.slot != first.slot and again.n_prefilled == 0  # not the row holding its prompt
    plans = [scheduler.plan(), scheduler.plan()]
    assert [chunk for plan in plans for chunk, _ in plan.chunks] == [
        PromptChunk(again.slot, 0, 4, False, True),
        PromptChunk(again.slot, 4, 2, True, True),
    ]
    assert all(plan.scoring == [again] and not plan.copies for plan in plans)
    assert scheduler.reused_prompt_tokens == 0


def newcomers_first_with_one_decoding(prefill_chunk_tokens: int) -> tuple[Scheduler, Sequence]:
    scheduler = Scheduler(4, prefill_chunk_tokens, prefix_caching=False, newcomers_first=True)
    running = request([1, 2, 3])
    queued(scheduler, running)
    run_prompt(scheduler, running, [4])
    return scheduler, running


def test_newcomers_first_a_completing_prompt_runs_alone_and_the_decoding_wait_at_most_every_other_step():
    scheduler, running = newcomers_first_with_one_decoding(prefill_chunk_tokens=64)
    first = request([10] * 6)
    queued(scheduler, first)
    plan = scheduler.plan()
    assert plan.decode == [] and plan.sampled == [first]
    assert [chunk for chunk, _ in plan.chunks] == [PromptChunk(first.slot, 0, 6, True)]
    first.generated.append(11)
    second = request([20] * 6)
    queued(scheduler, second)  # right after a step that left the decoding out: they go with it
    plan = scheduler.plan()
    assert plan.decode == [running, first] and plan.sampled == [running, first, second]
    second.generated.append(21)
    third = request([30] * 6)
    queued(scheduler, third)
    assert scheduler.plan().sampled == [third]
    assert scheduler.plan().sampled == [running, first, second, third]


def test_newcomers_first_a_prompt_chunk_that_draws_no_token_runs_with_the_decoding():
    scheduler, running = newcomers_first_with_one_decoding(prefill_chunk_tokens=4)
    long = request([10] * 6)
    queued(scheduler, long)
    plan = scheduler.plan()
    assert plan.decode == [running] and [chunk for chunk, _ in plan.chunks] == [PromptChunk(long.slot, 0, 4, False)]
    plan = scheduler.plan()  # its last chunk gives its first token: before the others' next
    assert plan.decode == [] and [chunk for chunk, _ in plan.chunks] == [PromptChunk(long.slot, 4, 2, True)]
