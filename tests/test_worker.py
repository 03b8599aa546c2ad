"""worker.JobGroup: calls queued while the thread is busy run as one job, each caller hearing its own outcome."""

import asyncio
import threading

import pytest

from kvshard.service.worker import JobGroup, SerialExecutor


def test_calls_queued_behind_a_busy_thread_run_together_and_keep_their_own_outcomes():
    async def scenario():
        thread = SerialExecutor("test-group")
        groups, ran = [], []

        def many(items):
            groups.append(list(items))
            ran.extend(items)
            return [ValueError(f"item {i}") if i % 3 == 2 else i * 10 for i in items]

        group = JobGroup(thread, many, job="test")
        assert await group.run(0) == 0  # the thread idle: a group of one, no wait
        busy = threading.Event()
        blocker = asyncio.ensure_future(thread.run(busy.wait))
        calls = [asyncio.ensure_future(group.run(i)) for i in range(1, 7)]
        await asyncio.sleep(0.05)
        calls[0].cancel()  # a caller gone: its item still runs with the group, its outcome dropped
        await asyncio.sleep(0)
        busy.set()
        await blocker
        outcomes = await asyncio.gather(*calls[1:], return_exceptions=True)
        assert groups == [[0], [1, 2, 3, 4, 5, 6]] and ran == [0, 1, 2, 3, 4, 5, 6]
        assert calls[0].cancelled()
        assert [o if isinstance(o, int) else str(o) for o in outcomes] == ["item 2", 30, 40, "item 5", 60]

        def failing(items):
            raise RuntimeError("the whole group failed")

        with pytest.raises(RuntimeError, match="whole group"):
            await JobGroup(thread, failing, job="test").run(1)
        thread.shutdown()

    asyncio.run(scenario())
