"""Least privilege on the data plane: the optional bearer token of `/v1/*` and the shims (`TOKENCREDIT_API_TOKEN`),
and the policy tokenizers a request may name (`TOKENCREDIT_TOKENIZER_DIRS`).

Both are settings read at start. The token is off by default (a loopback server is reachable only from its own
machine); `create_app` warns when a server binds a non-loopback address without one. The tokenizer allow-list is
empty by default: a request's `policy_tokenizer` can name nothing until the operator lists tokenizers or roots, and
everything refused gets one identical answer, so a client cannot tell a missing path from a forbidden one.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from typing import Dict, List, Optional, Tuple

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from workers.engine import InvalidField

__all__ = ["require_api_token", "api_token_enabled", "is_loopback", "log_data_plane_access", "TokenizerDirs", "TOKENIZER_REFUSED", "API_SCHEME"]

log = logging.getLogger("tokencredit.security")

# The OpenAPI security scheme's name (the admin API has its own, AdminToken).
API_SCHEME = "APIToken"
_bearer = HTTPBearer(auto_error=False, scheme_name=API_SCHEME,
                     description="TOKENCREDIT_API_TOKEN, when the server sets one (off by default)")

# One text for every refused `policy_tokenizer`: missing, outside the roots, not a tokenizer, or a name not listed.
TOKENIZER_REFUSED = (
    "not a tokenizer this server offers: give a name or a directory under a root the operator listed in "
    "TOKENCREDIT_TOKENIZER_DIRS (or send response_token_offsets, or let the SDK align ids with tokenizer=)"
)
# A saved tokenizer has one of these; a directory without either cannot load with AutoTokenizer anyway.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def api_token_enabled(settings) -> bool:
    token = getattr(settings, "api_token", None)
    return token is not None and bool(token.get_secret_value())


def require_api_token(request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
    """401 unless the request carries the server's data-plane token; nothing when the server has none."""
    settings = request.app.state.settings
    if not api_token_enabled(settings):
        return
    given = credentials.credentials if credentials is not None else ""
    # Constant time; neither token goes into a message or a log line.
    if not hmac.compare_digest(given.encode(), settings.api_token.get_secret_value().encode()):
        raise HTTPException(401, "missing or wrong bearer token (TOKENCREDIT_API_TOKEN)", headers={"WWW-Authenticate": "Bearer"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def log_data_plane_access(settings, tokenizers: "TokenizerDirs") -> None:
    """Say at start who may call and which tokenizers a request may name (never the token itself)."""
    if not api_token_enabled(settings) and not is_loopback(settings.host):
        log.warning(
            "binding %s without TOKENCREDIT_API_TOKEN: anyone who can reach this port can score with the reward "
            "model and load it with work; set TOKENCREDIT_API_TOKEN (clients send it as a bearer token)", settings.host,
        )
    log.info("data-plane token: %s; policy tokenizers offered: %s",
             "required" if api_token_enabled(settings) else "off", tokenizers.describe())


class TokenizerDirs:
    """The allow-list of policy tokenizers, from `TOKENCREDIT_TOKENIZER_DIRS` (entries separated by `os.pathsep`).

    An entry `NAME=DIR` offers one tokenizer under a name; an entry `DIR` is a root: any tokenizer directory in it
    (or the root itself) may be named by its path, absolute or relative to the root. Paths are resolved (symlinks,
    `..`) before the check, so a link inside a root that points outside it is refused.

    Example:
        >>> dirs = TokenizerDirs.parse("")
        >>> dirs.describe()
        'none'
    """

    def __init__(self, names: Dict[str, str], roots: List[str]):
        self.names = names
        self.roots = roots

    @classmethod
    def parse(cls, spec: Optional[str]) -> "TokenizerDirs":
        names: Dict[str, str] = {}
        roots: List[str] = []
        for entry in (spec or "").split(os.pathsep):
            entry = entry.strip()
            if not entry:
                continue
            name, sep, path = entry.partition("=")
            if sep and name and "/" not in name:
                names[name] = os.path.expanduser(path)
            else:
                roots.append(os.path.expanduser(entry))
        return cls(names, roots)

    def describe(self) -> str:
        """For the start-up log line: what is offered (paths, never file contents)."""
        parts = [f"{n}={p}" for n, p in self.names.items()] + [f"{r}/*" for r in self.roots]
        return ", ".join(parts) or "none"

    def resolve(self, value: str) -> str:
        """The real directory `value` names, or InvalidField("policy_tokenizer", TOKENIZER_REFUSED)."""
        for candidate, roots in self._candidates(value):
            real = _real(candidate)
            # Inside a root first: nothing outside the offered folders is even looked at.
            inside = real is not None and any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots)
            if inside and _is_tokenizer_dir(real):
                return real
        raise InvalidField("policy_tokenizer", TOKENIZER_REFUSED)

    def _candidates(self, value: str) -> List[Tuple[str, List[str]]]:
        if "\x00" in value or not value.strip():
            return []
        out: List[Tuple[str, List[str]]] = []
        if value in self.names:
            # A named tokenizer is its own (only) root.
            path = _real(self.names[value])
            if path is not None:
                out.append((path, [path]))
        roots = [r for r in (_real(root) for root in self.roots) if r is not None]
        if os.path.isabs(value):
            named = [p for p in (_real(p) for p in self.names.values()) if p is not None]
            out.append((value, roots + named))
        else:
            out.extend((os.path.join(root, value), [root]) for root in roots)
        return out


def _real(path: str) -> Optional[str]:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return None


def _is_tokenizer_dir(path: str) -> bool:
    try:
        return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)
    except (OSError, ValueError):
        return False
