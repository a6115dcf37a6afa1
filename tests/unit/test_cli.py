from __future__ import annotations

import json

from tests.helpers import mlops_env, run_mlops


def test_doctor_prints_one_json_object_with_the_runtime_report():
    run = run_mlops("doctor", "--no-registry")
    assert run.code == 0, run.stderr
    report = run.json
    assert report["packages"]["kserve"].startswith("0.20.")
    assert report["packages"]["mlflow"].startswith("3.17.")
    assert "CPUExecutionProvider" in report["onnxruntime_providers"]
    assert report["registry"] is None


def test_unknown_flag_exits_2_with_a_message_naming_the_flag():
    run = run_mlops("doctor", "--bogus")
    assert run.code == 2
    assert run.error_lines and "--bogus" in run.error_lines[0]
    assert run.json["error"]["type"] == "InvalidInput"


def test_missing_subcommand_is_a_usage_error():
    run = run_mlops()
    assert run.code == 2
    assert "command" in run.json["error"]["message"]


def test_unreachable_registry_fails_with_its_url_and_exit_1():
    run = run_mlops("doctor", "--mlflow-uri", "http://127.0.0.1:9")
    assert run.code == 1
    assert run.json["error"] == {
        "type": "BackendUnavailable",
        "message": run.json["error"]["message"],
    }
    assert "MLflow tracking server at http://127.0.0.1:9 is unreachable" in run.json["error"]["message"]
    assert len(run.error_lines) == 1


def test_result_file_gets_the_same_json_as_stdout(tmp_path):
    target = tmp_path / "xcom" / "return.json"
    run = run_mlops("--result-file", str(target), "doctor", "--no-registry")
    assert run.code == 0
    assert json.loads(target.read_text()) == run.json


def test_result_file_gets_the_error_too(tmp_path):
    target = tmp_path / "return.json"
    run = run_mlops("--result-file", str(target), "doctor", "--mlflow-uri", "http://127.0.0.1:9")
    assert run.code == 1
    assert json.loads(target.read_text())["error"]["type"] == "BackendUnavailable"


def test_bad_setting_in_the_environment_is_one_line_naming_it():
    run = run_mlops("stack", "status", env=mlops_env(MLOPS_MLFLOW__PORT="five"))
    assert run.code == 2
    assert len(run.error_lines) == 1
    assert "MLOPS_MLFLOW__PORT" in run.error_lines[0]


def test_negative_ttl_is_refused_naming_the_flag():
    run = run_mlops("stack", "up", "--ttl-s", "-5")
    assert run.code == 2
    assert "--ttl-s" in run.json["error"]["message"]
