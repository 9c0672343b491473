"""The search for a nonce, spread over worker processes.

`Miner.proof_of_work` answers exactly what `blockchain.proof_of_work` answers (the smallest nonce that passes),
only faster: consecutive ranges of nonces are searched in parallel and taken in order. A node hands it to its
`Blockchain` as the nonce search; the chain itself stays the protocol alone.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import count
from multiprocessing import get_context

from blockchain import NONCES_PER_TASK, Block, content_template, proof_of_work, search_nonces

PARENT_CHECK_SECONDS = 1.0
TASKS_IN_FLIGHT_PER_WORKER = 2  # keeps every process busy while the next answer is awaited


def _exit_with_parent(parent: int) -> None:
    """In a mining process: end when the node that started it is gone (killed, not closed)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class Miner:
    """A pool of mining processes, started on first use (or by `warm_up`)."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def proof_of_work(self, previous_nonce: int, difficulty: int, *, block: Block | None = None) -> int:
        """The smallest positive nonce that passes: the paper's proof when `block` is None, else the content proof."""
        executor = self._get_executor()
        if executor is None:
            return proof_of_work(previous_nonce, difficulty, block=block)
        template = content_template(block) if block is not None else None
        starts = count(1, NONCES_PER_TASK)

        def submit() -> Future[int | None]:
            start = next(starts)
            return executor.submit(search_nonces, start, start + NONCES_PER_TASK, difficulty, previous_nonce, template)

        in_flight = [submit() for _ in range(TASKS_IN_FLIGHT_PER_WORKER * self.workers)]
        try:
            while True:
                found = in_flight.pop(0).result()
                if found is not None:
                    return found
                in_flight.append(submit())
        finally:
            for future in in_flight:
                future.cancel()

    def executor(self) -> ProcessPoolExecutor | None:
        """The mining processes, for other work that spreads over the cores (checking many signatures); None
        with one worker."""
        return self._get_executor()

    def _get_executor(self) -> ProcessPoolExecutor | None:
        if self.workers <= 1:
            return None
        with self._lock:
            if self._executor is None:
                # spawn, not fork: the node is multi-threaded, and a forked child could inherit held locks
                self._executor = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                                     initializer=_exit_with_parent, initargs=(os.getpid(),))
            return self._executor

    def warm_up(self) -> None:
        """Start the processes now, so the first mined block does not wait for them to spawn."""
        executor = self._get_executor()
        if executor is not None:
            for future in [executor.submit(search_nonces, 1, 2, 1, 1, None) for _ in range(self.workers)]:
                future.result()

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(cancel_futures=True)
                self._executor = None
