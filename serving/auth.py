"""The model server's bearer tokens: from the environment, else generated once into the state dir.

- the admin API's (load, traffic, promote, rollback): ``MLOPS_SERVING__ADMIN_TOKEN``, else
  ``<state_dir>/serving/admin-token``;
- ``POST /v1/feedback``'s: ``MLOPS_SERVING__FEEDBACK_TOKEN``; else none while the server binds to
  loopback only (the embedded stack: nobody else can reach it), and ``<state_dir>/serving/
  feedback-token`` when it binds beyond (labels train the next model: not anyone's to send).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from common.settings import Settings

TOKEN_FILE = "admin-token"
FEEDBACK_TOKEN_FILE = "feedback-token"


def admin_token(settings: Settings) -> str:
    """MLOPS_SERVING__ADMIN_TOKEN when set; else ``<state_dir>/serving/admin-token`` (made 0600 once)."""
    if settings.serving.admin_token is not None:
        return settings.serving.admin_token.get_secret_value()
    path = settings.state_file(settings.serving_dir / TOKEN_FILE, ("serving", "admin_token"), "the admin API")
    return _generated(path)


def feedback_token(settings: Settings) -> str | None:
    """The token ``POST /v1/feedback`` asks for, or None when it asks for none (loopback only)."""
    if settings.serving.feedback_token is not None:
        return settings.serving.feedback_token.get_secret_value()
    if loopback(settings.host):
        return None
    path = settings.state_file(
        settings.serving_dir / FEEDBACK_TOKEN_FILE, ("serving", "feedback_token"), "POST /v1/feedback"
    )
    return _generated(path)


def loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _generated(path: Path) -> str:
    """The token in ``path``, written there first (0600, created private) if it is not there yet."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def token_matches(expected: str, authorization: str | None) -> bool:
    """Whether an Authorization header carries the token (constant-time comparison)."""
    if not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(authorization[len("Bearer ") :].encode(), expected.encode())
