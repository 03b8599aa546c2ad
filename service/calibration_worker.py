"""Calibrations run in a worker process with its own copy of the served model, never on the shard's MLX thread.

A RateQuant Calibrate is some 31 forward passes and a profile-mode one minutes of them. As turns on the one MLX
thread, other sessions still waited a whole forward pass per turn (14 s at load 30, benchmarks/service_stall.py),
and a profile-mode Calibrate held the thread for its whole run. In their own process they only share the CPU.

One worker at a time: the first Calibrate starts it (it loads the model: seconds), later ones reuse it, one after
another, and it exits after IDLE_S without one. A cancelled Calibrate kills it (the next one starts a fresh
worker), so a Calibrate that did not answer left nothing behind. Its memory, a second copy of the model and the
calibration's activations, is that process's own, outside --memory-budget.
"""

import asyncio
import multiprocessing
import tempfile

IDLE_S = 60.0


def _ratequant(model, plan):
    from kvshard.service.calibration import calibration_steps

    steps = calibration_steps(model, plan)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _profile(model, name, prompts, budgets, tokens):
    """Calibrate a profile and save it in a fresh folder (the profile travels back as files, not pickles)."""
    from kvshard.quant.calibrate.profile import calibrate_profile, save_profile

    profile = calibrate_profile(model.model, model.tokenizer, name, prompts or None, budgets, validation_tokens=tokens)
    return save_profile(profile, tempfile.mkdtemp(prefix=f"kvshard-profile-{name}-"))


_JOBS = {"ratequant": _ratequant, "profile": _profile}


def _serve(model_name: str, conn) -> None:
    """(worker process) Load the model, then run jobs until the shard closes the pipe."""
    from kvshard.service.model import ServedModel

    model = ServedModel.load(model_name)
    while True:
        try:
            kind, args = conn.recv()
        except EOFError:  # the shard stopped or died
            return
        try:
            conn.send(("ok", _JOBS[kind](model, *args)))
        except ValueError as error:  # a request the library refuses: INVALID_ARGUMENT in the shard
            conn.send(("invalid", str(error)))
        except Exception as error:
            conn.send(("failed", f"{type(error).__name__}: {error}"))


class CalibrationWorker:
    def __init__(self):
        self._process = None
        self._conn = None
        self._lock = asyncio.Lock()
        self._idle = None

    async def run(self, model_name: str, kind: str, *args):
        """Run one job in the worker (started if needed) and return its result; ValueError for a refused request."""
        async with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            if self._process is None or not self._process.is_alive():
                self._start(model_name)
            try:
                self._conn.send((kind, args))
                status, value = await asyncio.to_thread(self._conn.recv)
            except asyncio.CancelledError:
                self.stop()
                raise
            except (EOFError, OSError):
                self.stop()
                raise RuntimeError("calibration worker: it exited before answering (see the shard's log)") from None
            self._idle = asyncio.get_running_loop().call_later(IDLE_S, self.stop)
        if status == "invalid":
            raise ValueError(value)
        if status == "failed":
            raise RuntimeError(f"calibration worker: {value}")
        return value

    def _start(self, model_name: str) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process with MLX and gRPC threads
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(model_name, child), name="kvshard-calibration", daemon=True)
        self._process.start()
        child.close()

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
            self._conn.close()
            self._process = self._conn = None
