from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from common.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith("MLOPS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no ./mlops.toml unless a test writes one


def test_defaults_run_the_stack_on_loopback_with_state_in_the_project():
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.mlflow_url == "http://127.0.0.1:5000"
    assert settings.airflow_url == "http://127.0.0.1:8080"
    assert settings.state_dir.name == ".state"
    assert settings.airflow_home == settings.state_dir / "airflow"


def test_environment_sets_nested_sections(monkeypatch):
    monkeypatch.setenv("MLOPS_MLFLOW__PORT", "5123")
    monkeypatch.setenv("MLOPS_STATE_DIR", "/tmp/somewhere")
    settings = load_settings()
    assert settings.mlflow.port == 5123
    assert settings.mlflow_url == "http://127.0.0.1:5123"
    assert settings.state_dir == Path("/tmp/somewhere")


def test_config_file_is_read_and_environment_wins_over_it(monkeypatch, tmp_path):
    config = tmp_path / "stack.toml"
    config.write_text('state_dir = "/srv/mlops"\n[mlflow]\nport = 6000\n[airflow]\nport = 6001\n')
    monkeypatch.setenv("MLOPS_AIRFLOW__PORT", "7001")
    settings = load_settings(config)
    assert (settings.state_dir, settings.mlflow.port, settings.airflow.port) == (
        Path("/srv/mlops"),
        6000,
        7001,
    )


def test_mlops_toml_in_the_working_directory_is_the_default_config(tmp_path):
    (tmp_path / "mlops.toml").write_text("[mlflow]\nport = 6100\n")
    assert load_settings().mlflow.port == 6100


def test_mlops_config_variable_points_at_the_config_file(monkeypatch, tmp_path):
    config = tmp_path / "elsewhere.toml"
    config.write_text("[airflow]\nport = 6200\n")
    monkeypatch.setenv("MLOPS_CONFIG", str(config))
    assert load_settings().airflow.port == 6200


def test_bad_value_names_the_environment_variable(monkeypatch):
    monkeypatch.setenv("MLOPS_MLFLOW__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"MLOPS_MLFLOW__PORT: .*valid integer.*'not-a-port'"):
        load_settings()


def test_out_of_range_port_is_refused(monkeypatch):
    monkeypatch.setenv("MLOPS_AIRFLOW__PORT", "70000")
    with pytest.raises(ConfigError, match="MLOPS_AIRFLOW__PORT"):
        load_settings()


def test_unknown_key_in_the_config_file_names_key_and_file(tmp_path):
    config = tmp_path / "typo.toml"
    config.write_text("[mlflow]\nprot = 5000\n")
    with pytest.raises(ConfigError, match=rf"\[mlflow\] prot in {config}"):
        load_settings(config)


def test_missing_config_file_names_the_flag_and_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"--config: config file '.*nope.toml' does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_missing_config_file_from_the_variable_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("MLOPS_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match="MLOPS_CONFIG: config file"):
        load_settings()


def test_unparsable_config_file_is_a_config_error(tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text("[mlflow\nport = 1\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_settings(config)


def test_readme_documents_every_setting():
    from pydantic import BaseModel

    from common.settings import Settings, env_name
    from tests.helpers import PROJECT_ROOT

    def names(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[str]:
        out = []
        for field_name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                out += names(annotation, (*prefix, field_name))
            else:
                out.append(env_name((*prefix, field_name)))
        return out

    readme = (PROJECT_ROOT / "README.md").read_text()
    missing = [name for name in names(Settings) if f"`{name}`" not in readme]
    assert missing == []


def test_without_local_state_every_file_default_is_refused_naming_its_setting(monkeypatch, tmp_path):
    """In a pod (MLOPS_LOCAL_STATE=false) nothing falls back to the state dir or the embedded stack."""
    from serving.auth import admin_token, feedback_token
    from serving.targets import get_deployment_target

    monkeypatch.setenv("MLOPS_LOCAL_STATE", "false")
    monkeypatch.setenv("MLOPS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MLOPS_HOST", "0.0.0.0")
    settings = load_settings()
    refused = {
        "MLOPS_LOGS__STORE": lambda: settings.log_store_url,
        "MLOPS_MLFLOW__URL": lambda: settings.mlflow_url,
        "MLOPS_SERVING__URL": lambda: settings.deployment_target,
        "MLOPS_SERVING__ADMIN_TOKEN": lambda: admin_token(settings),
        "MLOPS_SERVING__FEEDBACK_TOKEN": lambda: feedback_token(settings),
        "MLOPS_SERVING__TARGET_TOKEN": lambda: get_deployment_target("http://models.ml:8090", settings),
    }
    for setting, use in refused.items():
        with pytest.raises(ConfigError, match=f"needs {setting}|set {setting}") as caught:
            use()
        assert "MLOPS_LOCAL_STATE=false" in str(caught.value)
    assert not (tmp_path / "state").exists()
    assert not settings.scratch_dir("reports").is_relative_to(tmp_path)


def test_without_local_state_the_settings_that_replace_the_files_are_used(monkeypatch, tmp_path):
    from serving.auth import admin_token

    token = "t" * 32
    for key, value in {
        "MLOPS_LOCAL_STATE": "false", "MLOPS_STATE_DIR": str(tmp_path / "state"),
        "MLOPS_LOGS__STORE": "elasticsearch://search.ml:9200", "MLOPS_MLFLOW__URL": "http://mlflow.ml:5000",
        "MLOPS_SERVING__TARGET": "kserve://ml", "MLOPS_SERVING__ADMIN_TOKEN": token,
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.log_store_url == "elasticsearch://search.ml:9200"
    assert settings.mlflow_url == "http://mlflow.ml:5000"
    assert settings.deployment_target == "kserve://ml" and admin_token(settings) == token
    assert not (tmp_path / "state").exists()
