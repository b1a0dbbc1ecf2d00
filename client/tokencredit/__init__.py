"""TokenCredit SDK: dense, explainable per-token rewards for RLHF.

`Client` / `AsyncClient` call the service; `DenseReward` is what they return; `errors` holds the typed
exceptions; `tokens.policy_tokens` turns a policy's generated ids into the offsets the service needs;
`tokencredit.adapters.{trl,openrlhf,verl}` plug the client into trainers (each imports its trainer lazily).
"""

from tokencredit._config import Retry, Timeouts
from tokencredit.client import AsyncClient, Client
from tokencredit.errors import (
    ConnectError,
    InvalidRequestError,
    ItemFailedError,
    PayloadTooLargeError,
    RateLimitedError,
    RequestTimeout,
    ResponseInvariantError,
    RewardServiceError,
    ServerError,
    ServiceUnavailableError,
    TokenCreditError,
    TransportError,
)
from tokencredit.results import Attribution, DenseReward, as_numpy, as_torch
from tokencredit.tokens import PolicyTokens, policy_tokens

__version__ = "0.1.0"

__all__ = [
    "Client", "AsyncClient", "DenseReward", "Attribution", "as_numpy", "as_torch", "Retry", "Timeouts",
    "PolicyTokens", "policy_tokens", "TokenCreditError", "TransportError", "ConnectError", "RequestTimeout",
    "RewardServiceError", "InvalidRequestError", "PayloadTooLargeError", "RateLimitedError",
    "ServiceUnavailableError", "ServerError", "ItemFailedError", "ResponseInvariantError",
]
