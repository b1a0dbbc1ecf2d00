"""The embedded server's background trainer of the amortized credit head (issue 15).

A daemon thread at the lowest OS priority that waits for full-budget shap explanations to accumulate in the RM's
`AmortizedCredit` buffer, fits a new head version on them (continuing from the current one), saves it atomically and
publishes it. It never runs while a request is waiting for or inside the engine: between training batches it
checks `busy()` and sleeps until the engine is idle, so at most one small training batch (tens of milliseconds on
the demo RM) overlaps the start of a request. The engine thread only appends examples to a bounded buffer.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Optional

from workers.credit_head import train_head
from workers.credit_serving import AmortizedCredit

__all__ = ["CreditTrainer"]

log = logging.getLogger("tokencredit.credit")


class CreditTrainer:
    """Trains new head versions from the examples the service collects.

    Args:
        credit: the RM's amortized-credit state (examples in, new heads out).
        busy: True while requests are pending; training pauses between batches until it turns False.
        train_every: fit once this many new examples arrived (and at least this many are held).
        epochs: at most this many epochs per fit (early stopping on the buffer's own validation split).
    """

    def __init__(self, credit: AmortizedCredit, *, busy: Callable[[], bool], train_every: int = 64, epochs: int = 30):
        self.credit = credit
        self.busy = busy
        self.train_every = int(train_every)
        self.epochs = int(epochs)
        self.last_error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokencredit-credit-trainer", daemon=True)

    def start(self) -> "CreditTrainer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _pause_or_stop(self) -> bool:
        """Between training batches: wait while the engine has work; True when the server is shutting down."""
        while self.busy() and not self._stop.is_set():
            self._stop.wait(0.05)
        return self._stop.is_set()

    def _run(self) -> None:
        try:  # Linux threads have their own nice value: the lowest priority, so requests' threads always win the CPU
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while not self._stop.is_set():
            examples = self.credit.wait_for_examples(self.train_every, self.train_every, timeout=0.5)
            if examples is None or self._pause_or_stop():
                continue
            try:
                head = train_head(
                    examples, rm_name=self.credit.rm_name, rm_revision=self.credit.rm_revision,
                    version=self.credit.next_version(), previous=self.credit.head, epochs=self.epochs,
                    should_stop=self._pause_or_stop,
                )
                if self._stop.is_set():
                    break
                path = self.credit.publish(head)
                log.info("credit head v%d trained on %d examples (validation Spearman alone %.3f) -> %s", head.version,
                         len(examples), head.reports["alone"]["val_spearman"], path)
            except Exception as exc:  # noqa: BLE001 - a failed fit must not kill the thread; the next one may work
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("credit head training failed")
