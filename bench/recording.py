"""Records the exact forward passes an explanation makes, then replays them bare: engine time / forward time."""

from __future__ import annotations

import time

import torch


class ForwardRecorder:
    """Context manager around `RewardModel.scores`: keeps each call's inputs; `replay()` times them alone."""

    def __init__(self, model):
        self.model = model
        self.calls = []
        self._original = None

    def __enter__(self):
        self._original = self.model.scores

        def recording(ids, types=None, low_precision=False, cache=None):
            self.calls.append((ids.copy(), None if types is None else types.copy(), low_precision, cache))
            return self._original(ids, types, low_precision, cache)

        self.model.scores = recording
        return self

    def __exit__(self, *exc):
        self.model.scores = self._original

    def replay(self) -> float:
        """Seconds for the same forward passes with nothing around them (inference_mode, same chunks, same cache)."""
        with torch.inference_mode():
            start = time.perf_counter()
            for ids, types, low, cache in self.calls:
                self._original(ids, types, low, cache)
            return time.perf_counter() - start
