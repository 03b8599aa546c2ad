"""One-thread executors the asyncio handlers hand blocking work to.

All MLX work runs on a single dedicated thread: MLX arrays, streams and the compiled samplers are not safe to
drive from arbitrary threads, and one compute worker per model is the shard's contract anyway. Sessions take
turns on it token by token, so many sessions progress in parallel. Store I/O gets its own thread so an fsync
never stalls compute.
"""

import asyncio
import ctypes
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache

from kvshard.service import metrics


class SerialExecutor:
    def __init__(self, name: str):
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn, *args, job: str | None = None):
        """Run fn(*args) on the thread. If the caller is cancelled, fn still runs to its end; callers keep
        session state consistent by doing every mutation inside fn. `job` names it in the metrics (default:
        the function's name)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, fn, args, job)

    def _timed(self, fn, args, job):
        """fn(*args), its seconds counted by job (what keeps the thread busy: kvshard_worker_job_seconds)."""
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args)
        finally:
            job = job or getattr(fn, "__qualname__", None) or type(fn).__name__
            metrics.WORKER_JOB_SECONDS.labels(self.name, job).observe(time.perf_counter() - started)
            metrics.WORKER_JOB_CPU_SECONDS.labels(self.name, job).inc(time.thread_time() - cpu)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class JobGroup:
    """Calls of one kind that reach a SerialExecutor's thread together run as one job there: `many(items)` gets
    every item queued when the thread takes the job and returns one outcome per item (its result, or an exception
    raised in its caller). A call adds no wait when the thread is idle; the ones queued behind a running job go
    together in the next. Used where one evaluation or one write serves many callers as cheaply as one: commits
    (service/commits.py), snapshots and batch-arena releases of streams that end in the same step.

    A caller cancelled meanwhile leaves its item in the group: it still runs, its outcome dropped."""

    def __init__(self, executor: SerialExecutor, many, job: str, most: int | None = None):
        self.executor = executor
        self.many = many
        self.job = job
        self.most = most  # the most items one job takes (None: all that are queued)
        self._queued: deque[tuple[object, asyncio.Future]] = deque()  # appended on the event loop, taken on the thread
        self._runner: asyncio.Task | None = None

    async def run(self, item):
        future = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run_queued())
        return await future

    async def _run_queued(self) -> None:
        while self._queued:
            try:
                outcomes = await self.executor.run(self._take_and_run, job=self.job)
            except BaseException as error:  # noqa: BLE001 (the thread refused the job: every caller's error)
                outcomes = [(future, error) for _, future in self._queued]
                self._queued.clear()
            for future, outcome in outcomes:
                if future.done():  # its caller was cancelled
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _take_and_run(self) -> list[tuple[asyncio.Future, object]]:
        """(the executor's thread) Everything queued when the thread gets here, run: each future and its outcome."""
        group = []
        while self._queued and (self.most is None or len(group) < self.most):
            group.append(self._queued.popleft())
        try:
            outcomes = self.many([item for item, _ in group])
        except Exception as error:  # noqa: BLE001 (`many` failed as a whole: every caller hears it)
            outcomes = [error] * len(group)
        return [(future, outcome) for (_, future), outcome in zip(group, outcomes, strict=True)]


async def run_to_completion(work):
    """Await a coroutine to its end even if the caller is cancelled meanwhile, then pass the cancellation on.

    asyncio.shield alone returns at the cancellation and leaves the work running behind the caller's back
    (which would release a session lock mid-commit); this keeps the caller waiting until the work is done."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


@lru_cache(maxsize=1)
def _openblas():
    """The process's OpenBLAS (the library `kvshard serve` preloads on Linux), or None."""
    library = ctypes.CDLL(None)
    return library if hasattr(library, "openblas_set_num_threads") else None


@contextmanager
def blas_threads(n: int):
    """OpenBLAS's matmuls on n threads for the block (nothing changes where the process has no OpenBLAS)."""
    library = _openblas()
    if library is None:
        yield
        return
    before = library.openblas_get_num_threads()
    library.openblas_set_num_threads(n)
    try:
        yield
    finally:
        library.openblas_set_num_threads(before)
