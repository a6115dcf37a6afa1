from __future__ import annotations

import argparse
import json
import sys

import pytest

from common.settings import load_settings
from mlops import cli
from mlops.stack import build_components
from tests.conftest import free_port
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
    error = run.json["error"]
    assert set(error) == {"type", "message"}
    assert error["type"] == "BackendUnavailable"
    assert "MLflow tracking server at http://127.0.0.1:9 is unreachable" in error["message"]
    assert run.error_lines == [f"mlops: error: {error['message']}"]


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


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subcommands(sub, (*path, name))
    return found


SUBCOMMANDS = _subcommands(cli.build_parser())


def test_the_subcommand_list_is_complete():
    # Guards the parametrized test below against a walk that finds nothing.
    assert {("stack", "probe"), ("serve", "load"), ("logs", "query"), ("demo",)} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("path", SUBCOMMANDS, ids=lambda p: " ".join(p) or "mlops")
def test_every_subcommand_answers_help(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*path, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mlops {' '.join(path)}".rstrip())


def _stack_on_free_ports(monkeypatch) -> None:
    for name in (
        "MLOPS_MLFLOW__PORT",
        "MLOPS_AIRFLOW__PORT",
        "MLOPS_SERVING__PORT",
        "MLOPS_LOGS__RECEIVER_PORT",
    ):
        monkeypatch.setenv(name, str(free_port()))


def _probe_names() -> list[str]:
    components = build_components(load_settings())
    return [c.name for c in components if c.probe] + [s.name for c in components for s in c.long_running]


@pytest.mark.parametrize("name", _probe_names())
def test_stack_probe_of_each_component_and_service_answers_json(name, monkeypatch, capsys):
    _stack_on_free_ports(monkeypatch)  # nothing listens there: not healthy, exit 3
    code = cli.main(["stack", "probe", name])
    result = json.loads(capsys.readouterr().out)
    assert code == cli.STATUS_NOT_HEALTHY
    assert result["name"] == name and result["healthy"] is False
    assert result["services"] and all(state != "healthy" for state in result["services"].values())


def test_stack_probe_of_an_unknown_name_is_a_usage_error(capsys):
    code = cli.main(["stack", "probe", "nonesuch"])
    assert code == 2
    assert "nothing to probe named 'nonesuch'" in json.loads(capsys.readouterr().out)["error"]["message"]


def test_an_unexpected_exception_still_gives_the_json_error_and_no_traceback(monkeypatch, capsys):
    def broken(settings, args):
        raise KeyError("surprise")

    monkeypatch.setattr(cli, "_doctor", broken)
    code = cli.main(["doctor", "--no-registry"])
    out, err = capsys.readouterr()
    assert code == 1
    assert json.loads(out)["error"]["type"] == "InternalError"
    assert "unexpected KeyError at test_cli.py" in json.loads(out)["error"]["message"]
    assert "Traceback" not in err


def test_a_result_json_cannot_encode_gives_the_json_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "_doctor", lambda settings, args: ({"value": object()}, 0))
    target = tmp_path / "return.json"
    code = cli.main(["--result-file", str(target), "doctor", "--no-registry"])
    out, err = capsys.readouterr()
    assert code == 1
    assert json.loads(out)["error"]["message"].startswith("unexpected TypeError")
    assert json.loads(target.read_text()) == json.loads(out)
    assert "Traceback" not in err


def test_logs_receive_refuses_a_port_that_is_none_naming_the_flag():
    result = run_mlops("logs", "receive", "--port", "70000")
    assert result.code == 2
    assert "--port" in result.json["error"]["message"]


def test_json_lines_also_reach_the_result_file_as_one_array(tmp_path, capsys, monkeypatch):
    """What a pod's XCom sidecar reads for `logs query --jsonl`: the lines printed, as one JSON array."""
    import time

    from monitoring.events import InferenceEvent
    from monitoring.logstore import get_log_store

    store = f"sqlite:///{tmp_path / 'inference.db'}"
    now = int(time.time() * 1000)
    get_log_store(store).write(
        [
            InferenceEvent(f"e{i}", now - i, "m", "1", "stable", f"r{i}", 0, {"x": i}, {"y": i}, 1.0)
            for i in range(3)
        ]
    )
    monkeypatch.setenv("MLOPS_LOCAL_STATE", "false")  # as in a pod: the store is named, not the default
    monkeypatch.setattr(cli, "_STDOUT", sys.stdout)
    target = tmp_path / "xcom" / "return.json"
    args = [
        "--result-file",
        str(target),
        "logs",
        "query",
        "--model",
        "m",
        "--since",
        "1h",
        "--jsonl",
        "--store",
        store,
    ]
    assert cli.main(args) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == 3 and json.loads(target.read_text()) == printed


def test_a_step_without_local_state_names_the_setting_it_misses_and_makes_no_file(tmp_path):
    state = tmp_path / "state"
    env = mlops_env(MLOPS_LOCAL_STATE="false", MLOPS_STATE_DIR=str(state))
    result = run_mlops("logs", "query", "--model", "m", "--since", "1h", env=env)
    assert result.code == 2  # configuration: not worth a retry
    assert "MLOPS_LOGS__STORE" in result.json["error"]["message"]
    monitor = run_mlops(
        "monitor", "run", "m", env={**env, "MLOPS_LOGS__STORE": f"sqlite:///{tmp_path / 'x.db'}"}
    )
    assert monitor.code == 2 and "MLOPS_MLFLOW__URL" in monitor.json["error"]["message"]
    assert not state.exists()
