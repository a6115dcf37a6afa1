"""The one operator the DAGs use: run an `mlops` command in the runtime environment, return its JSON.

The command is the same wherever it runs; the runtime connection (runtime.py) chooses the launcher:
a subprocess with the runtime interpreter on this machine, or a pod from the runtime image through
the KubernetesPodOperator. The command's JSON result becomes the task's XCom return value (from a
pod: the file ``--result-file`` writes, which the pod's XCom sidecar reads); a failing command
fails the task with the command's own error message, and exit 2 (bad usage or configuration) fails
it without retries, from a pod as from a process. A pod has no state dir: its command runs with
MLOPS_LOCAL_STATE=false, so a setting that is missing is named at once instead of a file being
made in a container that is thrown away.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from mlops_airflow.links import LINKS, push_links
from mlops_airflow.runtime import DEFAULT_CONN_ID, MlopsRuntimeHook, RuntimeConfig

XCOM_RESULT_FILE = "/airflow/xcom/return.json"  # where the pod's xcom sidecar looks
EXIT_USAGE = 2
# The runtime needs none of Airflow's own settings (database, secrets): they stay in Airflow.
_HIDDEN_ENV_PREFIXES = ("AIRFLOW", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


class _RunsMlops:
    """Running one ``mlops`` command where the runtime connection says, and reading its JSON."""

    arguments: list[str]
    mlops_conn_id: str
    env: dict[str, str]
    task_id: str
    log: Any
    _process: subprocess.Popen[str] | None = None

    def _configure(
        self, arguments: Any, mlops_conn_id: str, env: dict[str, str] | None, gpu: bool = False
    ) -> None:
        # A list (templated strings), or an XComArg an upstream task fills with the list at run time.
        self.arguments = list(arguments) if isinstance(arguments, list | tuple) else arguments
        self.mlops_conn_id = mlops_conn_id
        self.env = dict(env or {})
        self.gpu = gpu
        self._process = None

    @property
    def command(self) -> list[str]:
        return [str(arg) for arg in self.arguments if str(arg) != ""]

    def run_command(self, context: Any) -> Any:
        try:
            runtime = MlopsRuntimeHook(self.mlops_conn_id).get_runtime()
            if runtime.launcher == "kubernetes":
                result = self._run_pod(runtime, context)
            else:
                result = self._run_subprocess(runtime)
        except AirflowException as exc:
            # Kept for the tasks after it (the deploy DAG's abort says why in the registry).
            ti = context.get("ti") if hasattr(context, "get") else None
            if ti is not None:
                ti.xcom_push(key="mlops_error", value={"task": self.task_id, "message": str(exc)})
            raise
        push_links(context, result)
        return result

    # --- on this machine --------------------------------------------------------------------

    def _run_subprocess(self, runtime: RuntimeConfig) -> Any:
        argv = [str(runtime.python), "-m", "mlops", *self.command]
        env = {k: v for k, v in os.environ.items() if not k.startswith(_HIDDEN_ENV_PREFIXES)}
        env.update(runtime.env)
        env.update(self.env)
        self.log.info("running: %s", " ".join(argv))
        try:
            self._process = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                text=True, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise AirflowFailException(
                f"cannot start the mlops runtime '{runtime.python}' (connection '{self.mlops_conn_id}'): {exc}"
            ) from exc
        process = self._process
        stderr_tail: list[str] = []
        reader = threading.Thread(target=self._relay_stderr, args=(process, stderr_tail), daemon=True)
        reader.start()
        stdout = process.stdout.read() if process.stdout else ""
        code = process.wait()
        reader.join(timeout=10)
        return self._result(code, stdout, stderr_tail)

    def _relay_stderr(self, process: subprocess.Popen[str], tail: list[str]) -> None:
        # The command's progress lines show in the task log as they come.
        assert process.stderr is not None
        for line in process.stderr:
            line = line.rstrip("\n")
            self.log.info("%s", line)
            tail.append(line)
            del tail[:-20]

    def _result(self, code: int, stdout: str, stderr_tail: list[str]) -> Any:
        payload = _parse_json(stdout)
        name = " ".join(["mlops", *self.command[:2]])
        if code == 0:
            if payload is None and stdout.strip():
                raise AirflowException(f"{name} succeeded but did not print JSON: {stdout.strip()[:300]}")
            return payload
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            message = payload["error"].get("message", "")
        else:
            message = stderr_tail[-1] if stderr_tail else "(no output)"
        error = AirflowFailException if code == EXIT_USAGE else AirflowException
        raise error(f"{name} failed (exit {code}): {message}")

    def on_kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)

    # --- in a pod ---------------------------------------------------------------------------

    def _run_pod(self, runtime: RuntimeConfig, context: Any) -> Any:
        pod = self.pod_operator(runtime)
        try:
            return pod.execute(context)
        except AirflowException as exc:
            if not pod.exit_code:  # the command never ran or did not fail: the pod's own error
                raise
            # The command's result file holds its error, read by the sidecar as on success.
            stdout = json.dumps(pod.result) if pod.result is not None else ""
            return self._result(pod.exit_code, stdout, [str(exc).splitlines()[0]])

    def pod_operator(self, runtime: RuntimeConfig) -> Any:
        """The same command as a KubernetesPodOperator on the runtime image."""
        from kubernetes.client import models as k8s

        optional: dict[str, Any] = {}
        if runtime.kubernetes_conn_id:
            optional["kubernetes_conn_id"] = runtime.kubernetes_conn_id
        resources = {part: dict(values) for part, values in runtime.resources.items()}
        if self.gpu and runtime.gpus:
            for part in ("requests", "limits"):
                resources.setdefault(part, {})["nvidia.com/gpu"] = str(runtime.gpus)
        if resources:
            optional["container_resources"] = k8s.V1ResourceRequirements(**resources)
        env_from = [
            *(
                k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=n))
                for n in runtime.config_maps
            ),
            *(k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=n)) for n in runtime.secrets),
        ]
        return _pod_operator_class()(
            task_id=self.task_id,
            name=f"mlops-{self.task_id}".replace("_", "-").lower(),
            namespace=runtime.namespace,
            image=runtime.image,
            image_pull_policy=runtime.image_pull_policy,
            cmds=["mlops"],
            arguments=["--result-file", XCOM_RESULT_FILE, *self.command],
            env_vars={**runtime.env, **self.env, "MLOPS_LOCAL_STATE": "false"},
            env_from=env_from,
            service_account_name=runtime.service_account,
            labels={"app.kubernetes.io/part-of": "mlops", "mlops/task": self.task_id.replace("_", "-")},
            do_xcom_push=True,
            get_logs=True,
            on_finish_action="delete_pod",
            **optional,
        )


@functools.cache
def _pod_operator_class() -> type:
    """The KubernetesPodOperator, keeping the command's exit code and result file as the pod ends
    (the provider raises one error for every failure; exit 2 must not be retried). Made on first
    use: DAG files that never launch a pod do not import the Kubernetes client."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    class MlopsPod(KubernetesPodOperator):
        exit_code: int | None = None
        result: Any = None

        def cleanup(self, pod: Any, remote_pod: Any, xcom_result: Any = None, context: Any = None) -> None:
            self.exit_code, self.result = _exit_code(remote_pod, self.base_container_name), xcom_result
            super().cleanup(pod, remote_pod, xcom_result=xcom_result, context=context)

    return MlopsPod


def _exit_code(pod: Any, container: str) -> int | None:
    statuses = (pod.status.container_statuses if pod is not None and pod.status else None) or []
    for status in statuses:
        if status.name == container and status.state is not None and status.state.terminated is not None:
            return int(status.state.terminated.exit_code)
    return None


class MlopsOperator(_RunsMlops, BaseOperator):
    """Run ``mlops <arguments>`` and push its JSON result to XCom.

    :param arguments: the command line after ``mlops`` (templated, or an upstream task's XComArg);
        arguments that render to an empty string are dropped, so a Jinja conditional can add or
        leave out a flag.
    :param mlops_conn_id: the runtime connection (launcher, interpreter or image, env).
    :param env: extra MLOPS_* settings for this command (templated).
    :param links: show the task's links (canary report, MLflow version, model server metrics) that
        the command's result names under ``links``.
    :param gpu: in a pod, ask for the connection's ``gpus`` (training); a process uses what it finds.
    """

    template_fields: Sequence[str] = ("arguments", "env")
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        arguments: Sequence[str] | Any,
        mlops_conn_id: str = DEFAULT_CONN_ID,
        env: dict[str, str] | None = None,
        links: bool = False,
        gpu: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._configure(arguments, mlops_conn_id, env, gpu)
        if links:
            self.operator_extra_links = LINKS

    def execute(self, context: Any) -> Any:
        return self.run_command(context)


class MlopsReportOperator(MlopsOperator):
    """An MlopsOperator whose buttons are always shown: the links are the class's, so they hold for
    a mapped task too (``.partial(...).expand(arguments=...)``, which never calls ``__init__`` at parse)."""

    operator_extra_links = LINKS


class MlopsSensor(_RunsMlops, BaseSensorOperator):
    """Run ``mlops <arguments>`` at each poke until its JSON result says ``done``.

    Meant for ``mode="reschedule"``: between pokes the task holds no worker slot; each poke is one
    short command (``mlops deploy advance``), so the waiting is Airflow's and the state is the
    command's (kept where it survives a worker's death). The last result is the task's XCom.
    """

    template_fields: Sequence[str] = ("arguments", "env")
    ui_color = "#fdf1dc"

    def __init__(
        self,
        *,
        arguments: Sequence[str],
        mlops_conn_id: str = DEFAULT_CONN_ID,
        env: dict[str, str] | None = None,
        done_key: str = "done",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._configure(arguments, mlops_conn_id, env)
        self.done_key = done_key

    def poke(self, context: Any) -> PokeReturnValue:
        result = self.run_command(context)
        if not isinstance(result, dict) or self.done_key not in result:
            raise AirflowFailException(
                f"mlops {' '.join(self.command[:2])} printed no '{self.done_key}': {result!r}"
            )
        self.log.info("%s", result.get("state", result))
        return PokeReturnValue(is_done=bool(result[self.done_key]), xcom_value=result)


def _parse_json(stdout: str) -> Any:
    """One JSON document; JSON lines (``logs query --jsonl``) as a list, as their result file has
    them; else the last line, if it is JSON."""
    text = stdout.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    parsed = []
    for line in text.splitlines():
        try:
            parsed.append(json.loads(line))
        except ValueError:
            parsed.append(_NOT_JSON)
    if _NOT_JSON not in parsed:
        return parsed
    return None if parsed[-1] is _NOT_JSON else parsed[-1]


_NOT_JSON = object()
