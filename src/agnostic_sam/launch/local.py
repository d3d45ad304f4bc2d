"""The launchers that train in this machine's processes: ``inline`` (one run after another in
this process) and ``local`` (worker processes that die with the launcher, kill -9 included)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agnostic_sam.errors import UsageError
from agnostic_sam.launch.config import LauncherConfig
from agnostic_sam.launch.outcome import RunOutcome, finish, one_line, run_one
from agnostic_sam.train.config import TrainConfig

__all__ = ["local_slots", "run_inline", "run_local", "visible_gpus"]

_PARENT_POLL_S = 0.5  # how often a local worker checks that the launcher is still alive


def run_inline(todo: list[tuple[int, TrainConfig]], outcomes: list[RunOutcome],
                log: Callable[[str], None], on_done: Callable[[RunOutcome], None]) -> None:
    for done, (k, cfg) in enumerate(todo, 1):
        started = time.perf_counter()
        try:
            result = run_one(cfg)
        except Exception as exc:  # the sweep goes on; the summary names the run
            result = {"status": "error", "error": one_line(exc)}
        finish(outcomes[k], result, started, log, done, len(todo))
        on_done(outcomes[k])


# ----------------------------------------------------------------------------- local workers


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries ([] without
    CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def local_slots(planned: list[tuple[TrainConfig, str]], lc: LauncherConfig) -> list[str | None]:
    """One entry per worker: the GPU it gets (a ``CUDA_VISIBLE_DEVICES`` value) or None."""
    wants_gpu = [cfg for cfg, state in planned if state in ("new", "partial")
                 and cfg.device not in ("cpu", "mps")]
    gpus = visible_gpus() if wants_gpu else []
    jobs = lc.jobs or max(len(gpus), 1)
    if not gpus:
        return [None] * jobs
    pinned = [cfg for cfg in wants_gpu if cfg.device.startswith("cuda:")]
    if pinned:
        raise UsageError(f"--launcher local gives each run its own GPU; run {pinned[0].out} asks "
                         f"for {pinned[0].device}: use --device cuda or auto")
    return [gpus[i % len(gpus)] for i in range(jobs)]


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker die when the launcher dies, kill -9 included: the kernel's parent-death
    signal on Linux, and on every system a thread that notices the parent PID change."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def _local_worker(gpu: str | None, parent_pid: int, conn: Any) -> None:
    """A worker process: trains the runs the launcher sends, one after another, answering each
    with ``{"status", "error"}``; ends on None or when the launcher goes away."""
    _die_with_parent(parent_pid)
    if gpu is not None:  # before the first CUDA call (CUDA initializes lazily)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    while True:
        try:
            cfg = conn.recv()
        except (EOFError, OSError):
            return
        if cfg is None:
            return
        try:
            result = run_one(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which goes on
            result = {"status": "error", "error": one_line(exc)}
        conn.send(result)


class _Worker:
    """The launcher's end of one worker process and the run it is training."""

    def __init__(self, context: Any, gpu: str | None) -> None:
        self.conn, child = context.Pipe()
        self.gpu = gpu
        self.proc = context.Process(target=_local_worker, name="agnostic-sam-worker",
                                    args=(gpu, os.getpid(), child))
        self.proc.start()
        child.close()  # the worker holds the only other end: EOF here when it dies
        self.run: tuple[int, float] | None = None  # (outcome index, start time)

    def give(self, k: int, cfg: TrainConfig) -> None:
        self.conn.send(cfg)
        self.run = (k, time.perf_counter())

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join()
        self.conn.close()


def run_local(todo: list[tuple[int, TrainConfig]], outcomes: list[RunOutcome],
               slots: list[str | None], log: Callable[[str], None],
               on_done: Callable[[RunOutcome], None]) -> None:
    """One worker process per slot (at most one per run), each training one run after another:
    a worker pays its imports once. A worker that dies takes only its run with it; a new one
    takes its slot."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    if len(slots) > 1:  # one progress bar per worker would interleave: the launcher's lines only
        todo = [(k, dataclasses.replace(cfg, progress=False)) for k, cfg in todo]
    pending = deque(todo)
    workers = [_Worker(context, gpu) for gpu in slots[: len(todo)]]
    done = 0
    try:
        for w in workers:
            w.give(*pending.popleft())
        while any(w.run is not None for w in workers):
            busy = {w.conn: w for w in workers if w.run is not None}
            for conn in wait(list(busy)):
                w = busy[conn]
                assert w.run is not None  # busy holds the workers with a run
                k, started = w.run
                w.run = None
                try:
                    result = w.conn.recv()
                except (EOFError, OSError):
                    w.proc.join()
                    result = {"status": "error",
                              "error": f"worker exited with status {w.proc.exitcode}"}
                    w.conn.close()
                    workers.remove(w)
                    if pending:  # a new worker takes the dead one's slot
                        w = _Worker(context, w.gpu)
                        workers.append(w)
                done += 1
                finish(outcomes[k], result, started, log, done, len(todo))
                on_done(outcomes[k])
                if pending and w in workers:
                    w.give(*pending.popleft())
        for w in workers:
            w.stop()
        workers = []
    finally:  # an error or Ctrl-C here: no worker outlives the launcher
        for w in workers:
            w.proc.kill()
            w.proc.join()


