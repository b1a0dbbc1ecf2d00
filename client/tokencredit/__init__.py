"""TokenCredit SDK: dense, explainable per-token rewards for RLHF."""

__version__ = "0.1.0"
