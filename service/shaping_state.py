"""The server's current shaping weights and their version (the admin API will update them)."""

from __future__ import annotations

from dataclasses import dataclass

from tokencredit.types import ShapingInfo, ShapingWeights

__all__ = ["ShapingState"]


@dataclass
class ShapingState:
    weights: ShapingWeights
    version: int = 1

    def info(self) -> ShapingInfo:
        return ShapingInfo(version=self.version, weights=self.weights.as_dict())
