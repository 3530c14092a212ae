"""A colocated model's own bounds (`Slots`): running places, a bounded wait, refusals at once, and
places given back by requests that end or leave while waiting."""

import asyncio

import pytest
from ray.serve.exceptions import BackPressureError

from serve_app.apis.openai.protocol import ChatCompletionRequest
from serve_app.models.bounds import Slots


async def _hold(slots: Slots, release: asyncio.Event, entered: asyncio.Event) -> None:
    async with slots.taken():
        entered.set()
        await release.wait()


async def test_past_the_running_and_waiting_places_requests_are_refused_at_once():
    slots = Slots(running=1, waiting=1)
    release, first_in, second_in = asyncio.Event(), asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(_hold(slots, release, first_in))
    await first_in.wait()
    second = asyncio.create_task(_hold(slots, release, second_in))
    await asyncio.sleep(0)  # the second request takes the waiting place
    with pytest.raises(BackPressureError):
        async with slots.taken():
            pass
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert second_in.is_set()


async def test_a_request_that_leaves_while_waiting_gives_its_place_back():
    slots = Slots(running=1, waiting=1)
    release, first_in = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(_hold(slots, release, first_in))
    await first_in.wait()
    leaving = asyncio.create_task(_hold(slots, release, asyncio.Event()))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    third_in = asyncio.Event()
    third = asyncio.create_task(_hold(slots, release, third_in))  # not refused: the place is free
    await asyncio.sleep(0)
    assert not third.done()
    release.set()
    await asyncio.wait_for(asyncio.gather(first, third), 5)
    assert third_in.is_set()


async def test_without_a_waiting_bound_nothing_is_refused():
    slots = Slots(running=1, waiting=-1)
    release = asyncio.Event()
    entered = [asyncio.Event() for _ in range(20)]
    tasks = [asyncio.create_task(_hold(slots, release, event)) for event in entered]
    await asyncio.sleep(0)
    assert sum(event.is_set() for event in entered) == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert all(event.is_set() for event in entered)


async def test_a_whole_answer_gives_its_place_back_before_it_is_read_on():
    from cluster.schema import ModelConfig
    from serve_app.models.runner import ModelRunner
    from tests.fake_engine import fake_engine

    model = ModelConfig.model_validate({"id": "m", "source": {"path": "/m"}})
    runner = ModelRunner(model, fake_engine, Slots(running=1, waiting=0))
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "one two"}])
    held = runner.answer(request)
    answer = await held.__anext__()  # and never read on, as the ingress does with a whole answer
    assert answer.choices[0].message.content == "one two"
    again = await runner.answer(request).__anext__()  # not refused: the place is free
    assert again.choices[0].message.content == "one two"


async def _places(slots: Slots) -> tuple[int, int]:
    """A Slots' sizes by behaviour: requests arrive one at a time until one is refused at once;
    those that got in are running, the others waiting. Then all are let through."""
    release = asyncio.Event()
    held: list[tuple[asyncio.Task, asyncio.Event]] = []
    while True:
        entered = asyncio.Event()
        task = asyncio.create_task(_hold(slots, release, entered))
        await asyncio.sleep(0)  # its first step: in, waiting for a place, or refused
        if task.done():
            with pytest.raises(BackPressureError):
                task.result()
            break
        held.append((task, entered))
        assert len(held) <= 5000, "no refusal"
    running = sum(entered.is_set() for _, entered in held)
    release.set()
    await asyncio.wait_for(asyncio.gather(*(task for task, _ in held)), 5)
    assert all(entered.is_set() for _, entered in held)  # every waiting request got its turn
    return running, len(held) - running


async def test_unequal_running_and_waiting_places_are_each_kept():
    slots = Slots(running=3, waiting=2)
    release = asyncio.Event()
    running = [asyncio.Event() for _ in range(3)]
    tasks = [asyncio.create_task(_hold(slots, release, event)) for event in running]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in running)), 5)
    waiting = [asyncio.Event() for _ in range(2)]
    tasks += [asyncio.create_task(_hold(slots, release, event)) for event in waiting]
    await asyncio.sleep(0)  # the two take the waiting places
    assert not any(event.is_set() for event in waiting) and not any(task.done() for task in tasks)
    with pytest.raises(BackPressureError) as refused:
        async with slots.taken():
            pytest.fail("the sixth request got in")
    assert "num_queued_requests=2, max_queued_requests=2" in str(refused.value)
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert all(event.is_set() for event in waiting)


async def test_places_measured_by_behaviour_match_the_sizes_given():
    assert await _places(Slots(running=3, waiting=2)) == (3, 2)
    assert await _places(Slots(running=1, waiting=4)) == (1, 4)
    assert await _places(Slots(running=2, waiting=0)) == (2, 0)


@pytest.mark.parametrize(
    "deployment, bounds, places",
    [
        ({"num_replicas": 1, "max_ongoing_requests": 8, "max_queued_requests": 4}, (8, 4), 8 + 4 + 32),
        ({"num_replicas": 1, "max_ongoing_requests": 3, "max_queued_requests": 2}, (3, 2), 3 + 2 + 32),
        ({"max_ongoing_requests": 2, "max_queued_requests": 5}, (2, 5), 2 + 5 + 32),  # one replica by default
        # No queue bound: 1,000 waiting.
        ({"autoscaling": {"min_replicas": 1, "max_replicas": 1}}, (64, 1000), 64 + 1000 + 32),
        ({"num_replicas": 2, "max_ongoing_requests": 8, "max_queued_requests": 4}, None, None),
        ({"autoscaling": {"min_replicas": 1, "max_replicas": 3}}, None, None),
    ],
)
async def test_a_colocated_model_keeps_its_own_bounds_only_as_its_one_replica(deployment, bounds, places):
    from cluster.schema import ModelConfig
    from serve_app.models.bounds import colocated_bounds, colocated_slots
    from serve_app.models.deployment import colocated_options, deployment_options

    model = ModelConfig.model_validate({"id": "m", "source": {"path": "/m"}, "deployment": deployment})
    options = colocated_options(model)
    assert colocated_bounds(model) == bounds
    if bounds is not None:
        assert await _places(colocated_slots(model)) == bounds
        assert options["max_queued_requests"] == -1
        assert options["max_ongoing_requests"] == places
    else:
        assert colocated_slots(model) is None
        assert options == deployment_options(model)
