from __future__ import annotations

import pytest

from common.errors import BackendUnavailable, ConfigError
from common.settings import Settings
from serving.targets import get_deployment_target
from serving.targets.server import ServerTarget
from tests.conftest import free_port
from tests.helpers import mlops_env, run_mlops


def test_an_unknown_scheme_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="scheme 'ftp' is not one of http, https, kserve"):
        get_deployment_target("ftp://somewhere", Settings(state_dir=tmp_path))


def test_http_urls_are_model_server_targets_with_the_admin_token(tmp_path):
    target = get_deployment_target(
        "http://127.0.0.1:1",
        Settings(state_dir=tmp_path, serving={"admin_token": "s3cret-of-16-chars", "port": 1}),
    )
    assert isinstance(target, ServerTarget)
    assert target._http.headers["Authorization"] == "Bearer s3cret-of-16-chars"


def test_a_server_that_does_not_answer_is_backend_unavailable(tmp_path):
    target = ServerTarget(f"http://127.0.0.1:{free_port()}", "token", timeout_s=2)
    with pytest.raises(BackendUnavailable, match="is unreachable"):
        target.status("fraud")


def test_cli_serve_against_a_dead_server_exits_1_naming_it(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    run = run_mlops("serve", "status", "fraud", "--target", url, env=mlops_env(MLOPS_STATE_DIR=str(tmp_path)))
    assert run.code == 1
    assert f"model server at {url} is unreachable" in run.json["error"]["message"]


def test_cli_refuses_a_percentage_out_of_range():
    run = run_mlops("serve", "split", "fraud", "--canary-percent", "140")
    assert run.code == 2 and "--canary-percent" in run.json["error"]["message"]
