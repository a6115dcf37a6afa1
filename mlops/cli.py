"""`mlops`: one command per step of the loop; each prints one JSON object on stdout.

Logs and progress go to stderr. On failure a command prints ``{"error": {"type", "message"}}``
on stdout, ``mlops: error: <message>`` on stderr, and exits 1 (a runtime failure, worth a retry)
or 2 (bad usage or configuration, not worth one). ``--result-file`` also writes the JSON to a file
(the KubernetesPodOperator reads /airflow/xcom/return.json).

This module alone parses flags and prints; every command is a plain function elsewhere that
takes typed arguments and returns a result object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.errors import ConfigError, InvalidInput, MLOpsError
from common.settings import MIN_TOKEN_CHARS, Settings, load_settings
from mlops import __version__

STATUS_NOT_HEALTHY = 3
# What streams to the terminal (tail, --jsonl) writes here: during a command sys.stdout is stderr.
_STDOUT = sys.stdout


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own message names the flag
        raise InvalidInput(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mlops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"mlops {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML config file (default: $MLOPS_CONFIG, ./mlops.toml)"
    )
    parser.add_argument("--result-file", metavar="FILE", type=Path, help="also write the JSON result here")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    stack = commands.add_parser("stack", help="the embedded stack: MLflow, Airflow, the model server")
    stack_commands = stack.add_subparsers(dest="stack_command", required=True, parser_class=_Parser)
    up = stack_commands.add_parser("up", help="start what is not running and wait until all is healthy")
    up.add_argument(
        "--ttl-s", type=_positive_float, metavar="SECONDS", help="stop the stack by itself after this long"
    )
    up.set_defaults(handler=_stack_up)
    down = stack_commands.add_parser("down", help="stop every process `up` started")
    down.add_argument("--after-s", type=_positive_float, metavar="SECONDS", help=argparse.SUPPRESS)
    down.set_defaults(handler=_stack_down)
    status = stack_commands.add_parser(
        "status", help="what runs and whether it answers (exit 3 if not healthy)"
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(handler=_stack_status)
    run = stack_commands.add_parser("run", help="run one service in the foreground (what up and compose run)")
    run.add_argument("service")
    run.set_defaults(handler=_stack_run)
    probe = stack_commands.add_parser(
        "probe", help="health-check a component or service (exit 3 if not healthy)"
    )
    probe.add_argument("name", help="a component (mlflow, airflow) or one of its services")
    probe.set_defaults(handler=_stack_probe)
    compose = stack_commands.add_parser("compose", help="render docker/compose.yaml from the service table")
    compose.add_argument("--output", type=Path, metavar="FILE", help="write it here instead of stdout")
    compose.set_defaults(handler=_stack_compose)

    doctor = commands.add_parser("doctor", help="report the runtime environment: packages, GPU, registry")
    doctor.add_argument("--require-gpu", action="store_true", help="fail when no CUDA device is usable")
    registry = doctor.add_mutually_exclusive_group()
    registry.add_argument(
        "--mlflow-uri", metavar="URL", help="registry to check (default: the stack's MLflow)"
    )
    registry.add_argument("--no-registry", action="store_true", help="do not check the registry")
    doctor.set_defaults(handler=_doctor)

    serve = commands.add_parser(
        "serve", help="drive a deployment target: load, split, promote, rollback, status"
    )
    serve_commands = serve.add_subparsers(dest="serve_command", required=True, parser_class=_Parser)
    target_help = "deployment target URL (default: MLOPS_SERVING__TARGET, else the stack's model server)"
    load = serve_commands.add_parser("load", help="load a version as canary (or stable)")
    load.add_argument("model")
    load.add_argument("--version", required=True, help="the registry version")
    load.add_argument("--uri", required=True, help="models:/<name>/<version>, s3://..., or a local folder")
    load.add_argument("--role", choices=("canary", "stable"), default="canary")
    split = serve_commands.add_parser("split", help="set the canary's share of traffic")
    split.add_argument("model")
    split.add_argument("--canary-percent", type=_percent, required=True, metavar="P")
    split.add_argument("--mode", choices=("split", "shadow"), default="split")
    for name, text in (
        ("promote", "make the canary stable"),
        ("rollback", "drop the canary"),
        ("status", "show the rollout"),
    ):
        serve_commands.add_parser(name, help=text).add_argument("model")
    for name, sub in serve_commands.choices.items():
        sub.add_argument("--target", metavar="URL", help=target_help)
        sub.add_argument(
            "--token-file",
            type=Path,
            metavar="FILE",
            help="the target's admin token, in a file (default: MLOPS_SERVING__TARGET_TOKEN; the stack's own"
            " model server: its admin token)",
        )
        if name != "analyze":
            sub.set_defaults(handler=_serve)
    analyze = serve_commands.add_parser(
        "analyze",
        help="compare the canary with stable over a window of the inference log: pass, fail or insufficient",
    )
    analyze.add_argument("model")
    analyze.add_argument("--since", required=True, metavar="WHEN", help="1h, 30m, 2d ago, or an ISO time")
    analyze.add_argument("--until", metavar="WHEN", help="end of the window (default: now)")
    analyze.add_argument("--stable-version", help="default: the target's stable version")
    analyze.add_argument("--canary-version", help="default: the target's canary version")
    from serving.canary import Thresholds

    defaults = Thresholds()
    for flag, kind, what in (("--min-requests", int, "requests per role to decide at all"), *_THRESHOLDS):
        default = getattr(defaults, _dest(flag))
        analyze.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")
    analyze.add_argument(
        "--output", help="the output whose distribution is compared (default: label, else the first)"
    )
    _add_store(analyze)
    analyze.set_defaults(handler=_serve_analyze)
    manifests = serve_commands.add_parser(
        "manifests", help="render the KServe manifests (docker/k8s) from MLOPS_KSERVE__*"
    )
    manifests.add_argument("--output-dir", type=Path, required=True, metavar="DIR")
    manifests.set_defaults(handler=_serve_manifests)

    deploy = commands.add_parser(
        "deploy", help="the deploy DAG's steps: verify, begin, advance the canary ramp, finish, abort"
    )
    deploy_commands = deploy.add_subparsers(dest="deploy_command", required=True, parser_class=_Parser)
    verify = deploy_commands.add_parser(
        "verify", help="refuse a version unless its bytes, signature, runtime and input example check out"
    )
    verify.add_argument("model")
    verify.add_argument("--version", required=True, help="the registry version")
    verify.set_defaults(handler=_deploy_verify)
    begin = deploy_commands.add_parser(
        "begin", help="claim an approved version's rollout for a run (or say why there is nothing to do)"
    )
    begin.add_argument("model")
    begin.add_argument("--version", help="the registry version (default: the approved one)")
    ramp = begin.add_argument_group("the run's changes to the model's policy (MLOPS_DEPLOY__MODELS_FILE)")
    ramp.add_argument("--initial-percent", type=_share, metavar="P", help="the canary's first share")
    ramp.add_argument("--steps", type=_shares, metavar="P,P", help="the shares after it, rising, below 100")
    ramp.add_argument("--min-requests", type=int, help="canary requests a step needs before it is decided")
    ramp.add_argument("--min-step-s", type=float, metavar="S", help="seconds a step lasts at least")
    ramp.add_argument("--max-step-s", type=float, metavar="S", help="seconds a step may wait for requests")
    ramp.add_argument("--insufficient", choices=("rollback", "fail"), help="too few requests: what then")
    ramp.add_argument("--poke-s", type=float, metavar="S", help="how often the ramp is looked at")
    for flag, kind, what in _THRESHOLDS:
        ramp.add_argument(flag, type=kind, help=what)
    begin.set_defaults(handler=_deploy_begin)
    advance = deploy_commands.add_parser(
        "advance", help="one look at the canary ramp: wait, move to the next share, or decide"
    )
    advance.set_defaults(handler=_deploy_advance)
    finish = deploy_commands.add_parser(
        "finish", help="promote (or record the rollback), write the canary report, release the model"
    )
    finish.set_defaults(handler=_deploy_finish)
    abort = deploy_commands.add_parser(
        "abort", help="undo what a failed run left, and say so in the registry"
    )
    abort.add_argument("--reason", default="a task failed", help="in words, for the registry")
    abort.set_defaults(handler=_deploy_abort)
    policy = deploy_commands.add_parser("policy", help="a model's rollout policy, as the files make it")
    policy.add_argument("model")
    policy.set_defaults(handler=_deploy_policy)
    for name in ("begin", "advance", "finish", "abort"):
        sub = deploy_commands.choices[name]
        if name != "begin":
            sub.add_argument("model")
        sub.add_argument("--run-id", required=True, help="the deploy run (the rollout's owner)")
        sub.add_argument(
            "--target",
            metavar="URL",
            help="deployment target (default: the policy's, else MLOPS_SERVING__TARGET)",
        )

    logs = commands.add_parser("logs", help="the inference log: query a window, tail, prune")
    logs_commands = logs.add_subparsers(dest="logs_command", required=True, parser_class=_Parser)
    query = logs_commands.add_parser(
        "query", help="a model's events in a time window: counts, latency, the first ones"
    )
    query.add_argument("--model", required=True)
    query.add_argument("--since", required=True, metavar="WHEN", help="1h, 30m, 2d ago, or an ISO time")
    query.add_argument("--until", metavar="WHEN", help="end of the window (default: now)")
    query.add_argument("--version")
    query.add_argument("--role", choices=("stable", "canary", "shadow"))
    query.add_argument("--limit", type=int, default=20, help="events to include in the JSON (default 20)")
    query.add_argument(
        "--jsonl", action="store_true", help="print every event of the window, one JSON per line"
    )
    query.set_defaults(handler=_logs_query)
    tail = logs_commands.add_parser("tail", help="the newest events, as lines; --follow for new ones")
    tail.add_argument("--model", help="one model (default: all)")
    tail.add_argument("-n", "--lines", type=int, default=20)
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new events (Ctrl-C stops)")
    tail.set_defaults(handler=_logs_tail)
    prune = logs_commands.add_parser(
        "prune", help="drop events older than the retention (MLOPS_LOGS__RETENTION_DAYS)"
    )
    prune.add_argument("--older-than-days", type=int, help="override the retention")
    prune.set_defaults(handler=_logs_prune)
    for sub in logs_commands.choices.values():
        _add_store(sub)
    assets = logs_commands.add_parser(
        "assets", help="render search templates, dashboards (docker/search, docker/grafana)"
    )
    assets.add_argument("--output-dir", type=Path, required=True, metavar="DIR")
    assets.set_defaults(handler=_logs_assets)
    receive = logs_commands.add_parser(
        "receive", help="KServe's logger events (CloudEvents) into the store, until stopped"
    )
    receive.add_argument("--host", help="the address to listen on (default: MLOPS_HOST)")
    receive.add_argument("--port", type=int, help="the port (default: MLOPS_LOGS__RECEIVER_PORT, 8095)")
    receive.set_defaults(handler=_logs_receive)

    profile = commands.add_parser(
        "profile",
        help="build a registered version's reference profile from its training data, store it in MLflow",
    )
    profile.add_argument("model")
    profile.add_argument("--version", required=True, help="the registry version")
    profile.add_argument(
        "--data", required=True, type=Path, metavar="FILE", help=".csv, .parquet, .jsonl or .json"
    )
    profile.add_argument("--label", metavar="COLUMN", help="the label column (left out of the features)")
    profile.add_argument(
        "--features", type=_names, metavar="A,B", help="the columns to profile (default: all others)"
    )
    profile.add_argument(
        "--categorical", type=_names, default=[], metavar="A,B", help="numeric columns to treat as categories"
    )
    profile.set_defaults(handler=_profile)

    monitor = commands.add_parser(
        "monitor", help="the monitor DAG's step: check a window of the inference log"
    )
    monitor_commands = monitor.add_subparsers(dest="monitor_command", required=True, parser_class=_Parser)
    check = monitor_commands.add_parser(
        "run", help="one window: quality, skew, drift, outliers, performance; decide, report, summarise"
    )
    check.add_argument("model")
    check.add_argument(
        "--end", metavar="WHEN", help="the window's end: an ISO time, or 10m (that long ago; default: now)"
    )
    _add_overrides(check, "monitor", _MONITOR_FLAGS)
    _add_store(check)
    check.set_defaults(handler=_monitor_run)
    config = monitor_commands.add_parser("config", help="a model's monitor settings, as the files make them")
    config.add_argument("model", nargs="?", help="default: the defaults, and the models the DAG checks")
    config.set_defaults(handler=_monitor_config)

    train = commands.add_parser(
        "train",
        help="a model's first version: the retraining steps on a file or a built-in dataset, registered",
    )
    train.add_argument("model")
    data = train.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, metavar="FILE", help=".csv, .parquet, .jsonl or .json")
    data.add_argument("--dataset", metavar="NAME", help="a dataset shipped in an installed package: digits")
    train.add_argument("--label", default="label", metavar="COLUMN", help="the label column (default: label)")
    train.add_argument("--rows", type=int, metavar="N", help="only the first N rows")
    _add_overrides(train, "retrain", _RETRAIN_FLAGS)
    train.set_defaults(handler=_train)

    retrain = commands.add_parser(
        "retrain",
        help="the retrain DAG's steps: dataset, validate, train, export, evaluate, register, approve",
    )
    retrain_commands = retrain.add_subparsers(dest="retrain_command", required=True, parser_class=_Parser)
    from retraining.config import STEPS

    for step, text in zip(STEPS, (
        "the parent's training rows plus the labelled traffic, hashed, into the trigger's MLflow run",
        "the dataset against the training suite (great-expectations); a failure registers nothing",
        "a seeded PyTorch MLP with early stopping (CUDA when present)",
        "ONNX, and its parity with PyTorch on the held-out rows",
        "the candidate and the champion on the held-out rows and the recent window",
        "the candidate in MLflow: signature, input example, transformer spec, profile, lineage",
        "the approval policy: the challenger alias, or left for a person",
    ), strict=True):  # fmt: skip
        sub = retrain_commands.add_parser(step, help=text)
        sub.add_argument("model")
        sub.add_argument(
            "--trigger", required=True, metavar="KEY", help="what asked for it: one candidate per key"
        )
        if step == "dataset":
            sub.add_argument("--reason", default="", help="why, in words (recorded on the version)")
            sub.add_argument(
                "--monitor-run", default="", metavar="ID", help="the monitoring run that tripped"
            )
            sub.add_argument("--report", default="", metavar="URL", help="its report")
            sub.add_argument(
                "--end", metavar="WHEN", help="labelled traffic up to here: an ISO time (default: now)"
            )
            sub.add_argument(
                "--parent", metavar="VERSION", help="the version retrained (default: the champion)"
            )
        _add_overrides(sub, "retrain", _RETRAIN_FLAGS)
        sub.set_defaults(handler=_retrain)
    retrain_config = retrain_commands.add_parser(
        "config", help="a model's retrain settings, as the files make them"
    )
    retrain_config.add_argument("model", nargs="?")
    retrain_config.set_defaults(handler=_retrain_config)

    demo = commands.add_parser("demo", help="the main job: the stack up and every part of the loop, once")
    demo.add_argument(
        "--ttl-s", type=_positive_float, metavar="SECONDS", help="stop the stack by itself after this long"
    )
    demo.set_defaults(handler=_demo)
    return parser


# The canary analysis's thresholds, as flags of `serve analyze` and of `deploy begin` (a run's own).
_THRESHOLDS: tuple[tuple[str, type, str], ...] = (
    ("--alpha", float, "significance of the error-rate test"),
    ("--error-margin", float, "error-rate increase that fails"),
    ("--p95-ratio-max", float, "canary/stable p95 latency at most"),
    ("--p95-margin-ms", float, "and the canary at most this much slower (ms)"),
    ("--js-max", float, "prediction distributions' distance at most"),
)


# The monitor settings a run may change (`monitor run`, and the monitor DAG's form).
_MONITOR_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("--window", str, "how far back from --end: 30m, 1h, 2d"),
    ("--min-events", int, "a version's events a decision needs"),
    ("--alpha", float, "significance per family of tests"),
    ("--wasserstein-min", float, "a numeric feature's effect that trips (reference SDs)"),
    ("--js-min", float, "a categorical feature's or the predictions' JS distance that trips"),
    ("--mmd-min", float, "the multivariate test's MMD² that trips"),
    ("--outlier-rate-max", float, "share of outlying rows that trips"),
    ("--accuracy-drop-max", float, "accuracy drop that trips"),
    ("--cooldown", str, "no second trigger for this long after one: 6h"),
)


# The retrain settings a run may change (`train`, `retrain <step>`, and the retrain DAG's form).
_RETRAIN_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("--window", str, "labelled traffic this far back: 7d"),
    ("--epochs", int, "training epochs at most"),
    ("--hidden", str, "the MLP's hidden layer widths: 64 or 128,64"),
    ("--learning-rate", float, "Adam's learning rate"),
    ("--patience", int, "epochs without a better validation loss before stopping"),
    ("--seed", int, "the split's and the training's seed"),
    ("--parity-atol", float, "ONNX Runtime and PyTorch may differ by this"),
    ("--metric", str, "what approval compares: accuracy, macro_f1, log_loss"),
    ("--margin", float, "how much the candidate must beat the champion by"),
    ("--approve", str, "auto or manual"),
    ("--min-rows", int, "the dataset's rows at least"),
    ("--min-traffic-rows", int, "its labelled traffic rows at least"),
)


def _add_overrides(
    parser: argparse.ArgumentParser, section: str, flags: Sequence[tuple[str, type, str]]
) -> None:
    """A run's changes to one section of the models file, as flags."""
    group = parser.add_argument_group(
        f"the run's changes to the model's {section} settings (the models file)"
    )
    for flag, kind, what in flags:
        group.add_argument(flag, type=kind, help=what)


def _overrides(args: argparse.Namespace, flags: Sequence[tuple[str, type, str]]) -> dict[str, Any]:
    """The flags' values by setting name (None: the file's)."""
    return {_dest(flag): getattr(args, _dest(flag)) for flag, _, _ in flags}


def _add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store", metavar="URL", help="log store URL (default: MLOPS_LOGS__STORE, else the stack's)"
    )


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _number(what: str, accept: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a number that ``accept`` takes, else an error naming what was expected."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_percent = _number("a percentage between 0 and 100", lambda v: 0 <= v <= 100)
_share = _number("a percentage above 0 and below 100", lambda v: 0 < v < 100)


def _shares(text: str) -> list[float]:
    """``25,50``: canary shares, each above 0 and below 100."""
    return [_share(part) for part in text.split(",") if part.strip()]


_positive_float = _number("a positive number of seconds", lambda v: v > 0)


# --- handlers: parse nothing, call the plain function, return (result, exit code) -------------


def _stack_up(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from mlops.stack import Supervisor, build_components

    status = Supervisor(settings, build_components(settings), _progress).up(ttl_s=args.ttl_s)
    if status.airflow_login:
        login = status.airflow_login
        _progress(f"Airflow UI: {login['url']}  user: {login['user']}  password: in {login['password_file']}")
    _progress(f"MLflow UI:  {settings.mlflow_url}")
    return status, 0


def _stack_down(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from mlops.stack import Supervisor, build_components

    return Supervisor(settings, build_components(settings), _progress).down(after_s=args.after_s), 0


def _stack_status(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from mlops.stack import Supervisor, build_components

    status = Supervisor(settings, build_components(settings), _progress).status()
    code = 0 if status.healthy else STATUS_NOT_HEALTHY
    return (status if args.json else Text(_status_table(status) + "\n")), code


def _status_table(status: Any) -> str:
    rows = [("COMPONENT", "SERVICE", "STATE", "HEALTH", "PID", "URL")]
    for component in status.components.values():
        for service in component.services.values():
            rows.append(
                (
                    component.name,
                    service.name,
                    service.state,
                    service.health,
                    str(service.pid or "-"),
                    component.url or "-",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append(f"state dir: {status.state_dir}")
    if status.airflow_login:
        login = status.airflow_login
        lines.append(f"Airflow login: {login['user']}, password in {login['password_file']}")
    lines.append(f"model server admin token: {Path(status.state_dir) / 'serving' / 'admin-token'}")
    return "\n".join(lines)


def _stack_run(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from mlops.stack import run_service

    run_service(settings, args.service)  # replaces this process


def _stack_probe(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from mlops.stack import probe
    from mlops.stack.services import HEALTHY

    states = probe(settings, args.name)
    healthy = all(state == HEALTHY for state in states.values())
    return {
        "name": args.name,
        "healthy": healthy,
        "services": states,
    }, 0 if healthy else STATUS_NOT_HEALTHY


def _stack_compose(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from mlops.stack.compose import render_compose

    text = render_compose()
    if args.output is None:
        return Text(text), 0
    args.output.write_text(text)
    return {"written": str(args.output)}, 0


def _doctor(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from mlops.doctor import doctor

    url = None if args.no_registry else (args.mlflow_uri or settings.mlflow_url)
    return doctor(mlflow_url=url, require_gpu=args.require_gpu), 0


def _serve(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    target = _target(settings, args)
    command = args.serve_command
    if command == "load":
        return target.deploy(args.model, args.version, args.uri, args.role), 0
    if command == "split":
        return target.set_traffic(args.model, args.canary_percent, args.mode), 0
    return getattr(target, command)(args.model), 0


def _target(settings: Settings, args: argparse.Namespace) -> Any:
    from serving.targets import get_deployment_target

    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"--token-file: cannot read '{args.token_file}': {exc.strerror or exc}"
            ) from exc
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(
                f"--token-file: the token in '{args.token_file}' is shorter than {MIN_TOKEN_CHARS} characters"
            )
    return get_deployment_target(args.target or settings.deployment_target, settings, token)


def _serve_analyze(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from serving.canary import analyze

    start, end = _window(args)
    stable, canary = args.stable_version, args.canary_version
    if stable is None or canary is None:
        deployment = _target(settings, args).status(args.model)
        stable = stable or (deployment.stable.version if deployment.stable else None)
        canary = canary or (deployment.canary.version if deployment.canary else None)
    if stable is None or canary is None:
        raise InvalidInput(
            f"model '{args.model}' has no {'stable' if stable is None else 'canary'} version to compare"
        )
    from serving.canary import Thresholds

    thresholds = Thresholds(
        min_requests=args.min_requests,
        alpha=args.alpha,
        error_margin=args.error_margin,
        p95_ratio_max=args.p95_ratio_max,
        p95_margin_ms=args.p95_margin_ms,
        js_max=args.js_max,
        output=args.output,
    )
    store = _log_store(settings, args)
    return analyze(
        store.query(args.model, start, end, stable, "stable"),
        store.query(args.model, start, end, canary, "canary"),
        thresholds,
    ), 0


def _deploy_verify(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from serving.verify import verify_version

    return verify_version(args.model, args.version, settings), 0


def _deploy_begin(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from serving.rollout import begin

    sections = {
        "ramp": (
            "initial_percent",
            "steps",
            "min_requests",
            "min_step_s",
            "max_step_s",
            "insufficient",
            "poke_s",
        ),
        "thresholds": tuple(_dest(flag) for flag, _, _ in _THRESHOLDS),
    }
    overrides = {
        section: {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
        for section, keys in sections.items()
    }
    return begin(settings, args.model, args.version, args.run_id, overrides, args.target), 0


def _deploy_advance(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from serving.rollout import advance

    return advance(settings, args.model, args.run_id, args.target), 0


def _deploy_finish(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from serving.rollout import finish

    return finish(settings, args.model, args.run_id, args.target), 0


def _deploy_abort(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from serving.rollout import abort

    return abort(settings, args.model, args.run_id, args.reason, args.target), 0


def _deploy_policy(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from serving.policy import load_policy

    return load_policy(settings.deploy.models_file, args.model).to_dict(), 0


def _serve_manifests(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from serving.targets.kserve import render_manifests

    args.output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_manifests(settings.kserve, settings.logs).items():
        (args.output_dir / name).write_text(text)
        written.append(str(args.output_dir / name))
    return {"written": written}, 0


def _log_store(settings: Settings, args: argparse.Namespace) -> Any:
    from monitoring.logstore import get_log_store

    return get_log_store(args.store or settings.log_store_url, **settings.log_store_options())


def _window(args: argparse.Namespace) -> tuple[int, int]:
    """``--since`` and ``--until`` (default: now) as epoch milliseconds."""
    from monitoring.events import now_ms
    from monitoring.logs import parse_time

    now = now_ms()
    return parse_time(args.since, now, "--since"), parse_time(
        args.until, now, "--until"
    ) if args.until else now


def _logs_query(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from monitoring.logs import summarize

    start, end = _window(args)
    store = _log_store(settings, args)
    if args.jsonl:
        lines = [] if args.result_file is not None else None  # a pod's XCom: the events as one array
        for event in store.query(args.model, start, end, args.version, args.role):
            row = event.to_dict()
            _STDOUT.write(json.dumps(row) + "\n")
            if lines is not None:
                lines.append(row)
        if lines is not None:
            _write_result(json.dumps(lines), args.result_file)
        return None, 0
    return summarize(store, args.model, start, end, args.version, args.role, args.limit), 0


def _logs_tail(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    import time

    from monitoring.logs import line

    store = _log_store(settings, args)
    seen: set[str] = set()
    while True:
        fresh = [e for e in store.latest(args.model, args.lines) if e.event_id not in seen]
        for event in fresh:
            _STDOUT.write(line(event) + "\n")
            seen.add(event.event_id)
        _STDOUT.flush()
        if not args.follow:
            return None, 0
        time.sleep(1.0)


def _logs_prune(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from monitoring.logs import iso, retention_cutoff

    days = args.older_than_days or settings.logs.retention_days
    cutoff = retention_cutoff(days)
    removed = _log_store(settings, args).prune(cutoff)
    return {"store": args.store or settings.log_store_url, "older_than": iso(cutoff), "removed": removed}, 0


def _logs_assets(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from monitoring.dashboards import render_assets

    written = []
    for name, text in render_assets(settings.logs.index_prefix, settings.logs.retention_days).items():
        path = args.output_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(str(path))
    return {"written": written}, 0


def _logs_receive(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from serving.logger.kserve import serve

    port = settings.logs.receiver_port if args.port is None else args.port
    if not 0 < port < 65536:
        raise InvalidInput(f"--port: expected a port number, got {port}")
    host = args.host or settings.host
    code = serve(settings, host, port, _progress)
    return {"receiver": f"http://{host}:{port}/", "stopped": True}, code


def _profile(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    import tempfile

    from monitoring.profile import build_profile, read_table, store_profile

    data = read_table(args.data)
    _progress(f"profiling {len(data)} rows of '{args.data}' for {args.model} version {args.version}")
    profile = build_profile(
        args.model, args.version, data, args.label, args.features, args.categorical, source=str(args.data)
    )
    with tempfile.TemporaryDirectory() as folder:
        stored = store_profile(profile, settings.mlflow_url, settings.monitor.experiment, Path(folder))
    return {
        "model": args.model,
        "version": args.version,
        "rows": profile.rows,
        "features": {f.name: f.kind for f in profile.features},
        "expectations": len(profile.suite["expectations"]),
        "profile": stored,
    }, 0


def _monitor_run(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from monitoring.events import now_ms
    from monitoring.logs import parse_time
    from monitoring.monitor import monitor_window

    if args.store:
        settings = settings.model_copy(
            update={"logs": settings.logs.model_copy(update={"store": args.store})}
        )
    now = now_ms()
    end = parse_time(args.end, now, "--end") if args.end else now
    return monitor_window(settings, args.model, end, _overrides(args, _MONITOR_FLAGS), _progress), 0


def _monitor_config(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from monitoring.checks import load_monitor_config, monitored_models

    path = settings.deploy.models_file
    result = {"file": str(path), "settings": load_monitor_config(path, args.model).to_dict()}
    if args.model is None:
        result["models"] = monitored_models(path)
    return result, 0


def _train(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from retraining.pipeline import train_first

    if args.dataset:
        from retraining.builtin import load

        frame, source = load(args.dataset), f"the built-in dataset '{args.dataset}'"
    else:
        from monitoring.profile import read_table

        frame, source = read_table(args.data), str(args.data)
    if args.rows is not None:
        if args.rows < 1:
            raise InvalidInput(f"--rows: expected a positive number of rows, got {args.rows}")
        frame, source = frame.iloc[: args.rows].reset_index(drop=True), f"{source}, first {args.rows} rows"
    return train_first(
        settings, args.model, frame, args.label, source, _overrides(args, _RETRAIN_FLAGS), _progress
    ), 0


def _retrain(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from retraining import pipeline

    overrides = _overrides(args, _RETRAIN_FLAGS)
    if args.retrain_command == "dataset":
        end = None
        if args.end:
            from monitoring.events import now_ms
            from monitoring.logs import parse_time

            end = parse_time(args.end, now_ms(), "--end")
        trigger = pipeline.Trigger(args.trigger, args.reason, args.monitor_run, args.report, end, args.parent)
        return pipeline.step_dataset(settings, args.model, trigger, overrides, _progress), 0
    step = getattr(pipeline, f"step_{args.retrain_command}")
    return step(settings, args.model, args.trigger, overrides, _progress), 0


def _retrain_config(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from retraining.config import load_retrain_config

    path = settings.deploy.models_file
    return {"file": str(path), "settings": load_retrain_config(path, args.model).to_dict()}, 0


def _demo(settings: Settings, args: argparse.Namespace) -> tuple[Any, int]:
    from mlops.demo import demo

    result = demo(settings, _progress, ttl_s=args.ttl_s)
    login = result.airflow_login
    _progress(
        f"Airflow UI: {result.airflow_url}  user: {login['user']}  password: in {login['password_file']}"
    )
    _progress(f"MLflow UI:  {result.mlflow_url}")
    _progress(f"check_runtime run: {result.check_runtime['run']} ({result.check_runtime['state']})")
    _progress(f"done in {result.wall_s} s; stop the stack with: .venv/bin/mlops stack down")
    return result, 0


# --- output -------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


class Text(str):
    """A result printed as it is (a table, a file's content), not as JSON."""


def _emit(payload: Any, result_file: Path | None) -> None:
    if isinstance(payload, Text):
        sys.stdout.write(payload)
        sys.stdout.flush()
        return
    text = json.dumps(payload, default=_jsonable, indent=2 if sys.stdout.isatty() else None)
    print(text, flush=True)
    if result_file is not None:
        _write_result(text, result_file)


def _write_result(text: str, result_file: Path) -> None:
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    result_file: Path | None = None
    try:
        args = build_parser().parse_args(argv)
        result_file = args.result_file
        if args.config:
            # Children (the stack's services, Airflow's tasks) read the same file.
            os.environ["MLOPS_CONFIG"] = str(Path(args.config).resolve())
        handler: Callable[[Settings, argparse.Namespace], tuple[Any, int]] = args.handler
        settings = load_settings(args.config)
        # stdout carries the one result: whatever a library prints (MLflow's run links, say)
        # goes to stderr with the logs.
        with contextlib.redirect_stdout(sys.stderr):
            result, code = handler(settings, args)
        if result is not None:
            _emit(result, result_file)
        return code
    except MLOpsError as exc:
        return _fail(exc, exc.exit_code, result_file)
    except KeyboardInterrupt:
        print("mlops: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours or a library's: still the JSON error, never a traceback
        where = traceback.extract_tb(exc.__traceback__)[-1]
        place = f"{Path(where.filename).name}:{where.lineno}"
        return _fail(RuntimeError(f"unexpected {type(exc).__name__} at {place}: {exc}"), 1, result_file)


def _fail(exc: BaseException, code: int, result_file: Path | None) -> int:
    """The error as the CLI promises it: one line on stderr, the JSON object on stdout."""
    print(f"mlops: error: {exc}", file=sys.stderr, flush=True)
    kind = type(exc).__name__ if isinstance(exc, MLOpsError) else "InternalError"
    try:
        _emit({"error": {"type": kind, "message": str(exc)}}, result_file)
    except OSError as write_error:  # the result file cannot be written: stdout still has it
        print(f"mlops: error: --result-file: {write_error}", file=sys.stderr, flush=True)
    return code
