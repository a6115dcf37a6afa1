"""The model server's tokens: where each comes from, and who gets the admin token."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from common.settings import Settings, load_settings
from serving.auth import admin_token, feedback_token, loopback
from serving.targets import get_deployment_target, same_server


def test_feedback_needs_no_token_on_loopback_and_a_generated_one_beyond(tmp_path):
    assert feedback_token(Settings(state_dir=tmp_path, host="127.0.0.1")) is None
    token = feedback_token(Settings(state_dir=tmp_path, host="0.0.0.0"))
    path = tmp_path / "serving" / "feedback-token"
    assert token is not None and len(token) >= 32 and path.read_text().strip() == token
    assert path.stat().st_mode & 0o777 == 0o600
    assert feedback_token(Settings(state_dir=tmp_path, host="10.0.0.5")) == token  # made once
    chosen = Settings(state_dir=tmp_path, host="0.0.0.0", serving={"feedback_token": "f" * 20})
    assert feedback_token(chosen) == "f" * 20


@pytest.mark.parametrize(("host", "expected"), [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                                ("127.0.0.2", True), ("0.0.0.0", False), ("10.1.2.3", False),
                                                ("models.example.com", False)])  # fmt: skip
def test_loopback_addresses(host, expected):
    assert loopback(host) is expected


@pytest.mark.parametrize("variable", ["MLOPS_SERVING__ADMIN_TOKEN", "MLOPS_SERVING__FEEDBACK_TOKEN", "MLOPS_SERVING__TARGET_TOKEN"])  # fmt: skip
def test_a_configured_token_shorter_than_16_characters_is_refused_naming_its_variable(variable, monkeypatch):
    monkeypatch.setenv(variable, "short-secret")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert variable in str(refused.value) and "at least 16 characters" in str(refused.value)
    assert "short-secret" not in str(refused.value)  # a secret is never echoed


def test_the_stacks_admin_token_goes_to_the_stacks_own_server_only(tmp_path):
    settings = Settings(state_dir=tmp_path, serving={"port": 8090})
    own = admin_token(settings)
    for url in ("http://127.0.0.1:8090", "http://localhost:8090/"):
        assert get_deployment_target(url, settings)._http.headers["Authorization"] == f"Bearer {own}"
    for url in ("http://127.0.0.1:9999", "http://models.example.com:8090", "https://127.0.0.1:8090"):
        assert "Authorization" not in get_deployment_target(url, settings)._http.headers
    other = Settings(state_dir=tmp_path, serving={"target_token": "t" * 16})
    target = get_deployment_target("http://models.example.com:8090", other)
    assert target._http.headers["Authorization"] == "Bearer " + "t" * 16
    flag = get_deployment_target("http://models.example.com:8090", other, token="f" * 16)
    assert flag._http.headers["Authorization"] == "Bearer " + "f" * 16


def test_same_server_compares_scheme_port_and_host():
    assert same_server("http://127.0.0.1:8090", "http://localhost:8090")
    assert same_server("https://models.example.com", "https://models.example.com:443/")
    assert not same_server("http://127.0.0.1:8090", "http://127.0.0.1:8091")
    assert not same_server("http://127.0.0.1:8090", "http://10.0.0.1:8090")
