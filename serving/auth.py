"""The admin API's bearer token: from the environment, else generated once into the state dir."""

from __future__ import annotations

import hmac
import os
import secrets

from common.settings import Settings

TOKEN_FILE = "admin-token"


def admin_token(settings: Settings) -> str:
    """MLOPS_SERVING__ADMIN_TOKEN when set; else ``<state_dir>/serving/admin-token`` (made 0600 once)."""
    if settings.serving.admin_token is not None:
        return settings.serving.admin_token.get_secret_value()
    path = settings.serving_dir / TOKEN_FILE
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
