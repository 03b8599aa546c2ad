"""One-thread executors the asyncio handlers hand blocking work to.

All MLX work runs on a single dedicated thread: MLX arrays, streams and the compiled samplers are not safe to
drive from arbitrary threads, and one compute worker per model is the shard's contract anyway. Sessions take
turns on it token by token, so many sessions progress in parallel. Store I/O gets its own thread so an fsync
never stalls compute.
"""

import asyncio
import ctypes
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache


class SerialExecutor:
    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn, *args):
        """Run fn(*args) on the thread. If the caller is cancelled, fn still runs to its end; callers keep
        session state consistent by doing every mutation inside fn."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


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
