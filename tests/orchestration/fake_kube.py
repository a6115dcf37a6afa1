"""A fake Kubernetes API server for tests: real HTTP on loopback, each pod run as a local process.

Airflow's KubernetesPodOperator (synchronous mode) drives it through the real kubernetes client,
so a pod task runs end to end without a cluster: the pod is created, found by its labels, its
logs followed, its XCom read and its sidecar killed through WebSocket exec, then it is deleted.
Only what that path uses is served; the rest of the API answers 404.

The pod's container named ``base`` runs as a subprocess (its command and args; an environment
built only from the pod spec, plus the host's PATH and HOME); ``/airflow/xcom/...`` arguments
point into the pod's own folder (its xcom volume). Every other container (the XCom sidecar)
"runs" idle until the operator signals it through an exec with stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

BASE = "base"
XCOM_PATH = "/airflow/xcom"
EXEC_PROTOCOL = "v4.channel.k8s.io"  # the client also offers v5; v4 needs no channel-close frames
STDOUT, STDERR, STATUS = b"\x01", b"\x02", b"\x03"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _failure(code: int, reason: str, message: str) -> JSONResponse:
    """An error as the API server words it (a Status), so the client raises ApiException(code)."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    return JSONResponse({**body, "reason": reason, "message": message, "code": code}, code)


class ContainerConfigError(Exception):
    """A secret, config map or key the container's environment names does not exist."""


def flag(params: Mapping[str, str], name: str) -> bool:
    """A boolean query parameter, read as the API server's Go does: the client sends ``True``."""
    return params.get(name, "false").lower() in ("1", "t", "true")


def selected(labels: dict[str, str], selector: str) -> bool:
    """Whether ``labels`` match an equality-based selector (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if term.startswith("!"):
            ok = term[1:] not in labels
        elif "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key) != value
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            ok = labels.get(key) == value
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def environment(
    container: dict, config_maps: dict[str, dict[str, str]], secrets: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The container's variables as the kubelet builds them: ``envFrom`` first, ``env`` over it."""
    stores = {"configMap": ("configmap", config_maps), "secret": ("secret", secrets)}

    def source(kind: str, ref: dict) -> dict[str, str]:
        word, store = stores[kind]
        if ref["name"] in store:
            return store[ref["name"]]
        if ref.get("optional"):
            return {}
        raise ContainerConfigError(f'{word} "{ref["name"]}" not found')

    env: dict[str, str] = {}
    for entry in container.get("envFrom", []):
        kind = "configMap" if "configMapRef" in entry else "secret"
        data = source(kind, entry[f"{kind}Ref"])
        env.update({entry.get("prefix", "") + key: value for key, value in data.items()})
    for var in container.get("env", []):
        if "valueFrom" not in var:
            env[var["name"]] = var.get("value", "")
            continue
        [(field, ref)] = var["valueFrom"].items()
        kind = field.removesuffix("KeyRef")
        if kind not in stores:
            raise ContainerConfigError(f"the fake resolves no valueFrom.{field} ({var['name']})")
        data = source(kind, ref)
        if ref["key"] in data:
            env[var["name"]] = data[ref["key"]]
        elif not ref.get("optional"):
            raise ContainerConfigError(f"couldn't find key {ref['key']} in {stores[kind][0]} {ref['name']}")
    return env


class Pod:
    """One pod: the object the API shows (PATCH changes it), and its base container's process."""

    def __init__(self, body: dict, folder: Path) -> None:
        self.body = body
        self.folder = folder
        self.xcom = folder / "xcom"
        self.xcom.mkdir(parents=True)
        self.started_at = _now()
        self.env: dict[str, str] = {}
        self.log: list[tuple[str, bytes]] = []  # (time, line), each line ending in a newline
        self.base: dict = {"waiting": {"reason": "ContainerCreating"}}  # replaced whole, never mutated
        self.stopped: dict[str, str] = {}  # idle container -> when the operator stopped it through exec
        self.process: subprocess.Popen | None = None
        self.follower: threading.Thread | None = None

    def start(
        self, container: dict, executables: dict[str, str], env: dict[str, str], timeout_s: float
    ) -> None:
        """Run the base container's command + args, or record why it could not start."""
        argv = [*container["command"], *container.get("args", [])]
        argv[0] = executables.get(argv[0], argv[0])
        argv = [str(self.xcom) + a[len(XCOM_PATH) :] if a.startswith(f"{XCOM_PATH}/") else a for a in argv]
        self.env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], **env}
        try:
            self.process = subprocess.Popen(
                argv, env=self.env, cwd=self.folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        except OSError as error:  # what a runtime reports for a missing or non-executable entrypoint
            self.base = {"terminated": self._ended(128, "StartError", str(error))}
            return
        self.base = {"running": {"startedAt": self.started_at}}
        self.follower = threading.Thread(target=self._follow, args=(timeout_s,), daemon=True)
        self.follower.start()

    def _follow(self, timeout_s: float) -> None:
        """Collect the output as the pod's log; its exit ends the base container (killed if too long)."""
        assert self.process is not None and self.process.stdout is not None
        timer = threading.Timer(timeout_s, self.kill)  # not a daemon: it outlives a forgotten exit
        timer.start()
        for line in self.process.stdout:
            self.log.append((_now(), line if line.endswith(b"\n") else line + b"\n"))
        code = self.process.wait()
        timer.cancel()
        code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a runtime reports it
        self.base = {"terminated": self._ended(code, "Completed" if code == 0 else "Error")}

    def _ended(self, code: int, reason: str, message: str | None = None) -> dict:
        ended = {"exitCode": code, "reason": reason, "startedAt": self.started_at, "finishedAt": _now()}
        return {**ended, "message": message} if message else ended

    def kill(self) -> None:
        """SIGKILL the base container's process group, if its process is not reaped yet."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def fail_to_start(self, message: str) -> None:
        self.base = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}

    def state(self, name: str) -> dict:
        if name == BASE:
            return self.base
        if name in self.stopped:
            ended = {"startedAt": self.started_at, "finishedAt": self.stopped[name]}
            return {"terminated": {"exitCode": 0, "reason": "Completed", **ended}}
        return {"running": {"startedAt": self.started_at}}

    def view(self) -> dict:
        """The pod with the status a kubelet would report now."""
        statuses = []
        for container in self.body["spec"]["containers"]:
            state = self.state(container["name"])
            statuses.append({
                "name": container["name"], "image": container.get("image", ""), "imageID": "",
                "ready": "running" in state, "started": "running" in state, "restartCount": 0, "state": state,
            })  # fmt: skip
        states = [status["state"] for status in statuses]
        if any("waiting" in state for state in states):
            phase = "Pending"
        elif any("running" in state for state in states):
            phase = "Running"
        else:
            phase = "Succeeded" if all(s["terminated"]["exitCode"] == 0 for s in states) else "Failed"
        status = {
            "phase": phase, "startTime": self.started_at, "containerStatuses": statuses,
            "conditions": [{"type": "PodScheduled", "status": "True"}],
        }  # fmt: skip
        return {**self.body, "status": status}


def merge(target: dict, patch: dict) -> None:
    """A JSON merge patch (what the operator's label patch needs of a strategic merge)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeKubernetes:
    """The fake API server, started in a thread on entry; on exit its pods' processes are killed.

    ``pods`` records every created pod's manifest exactly as posted (name -> JSON dict), deleted
    ones included. ``executables`` maps a command's executable name to a real path;
    ``config_maps`` and ``secrets`` (name -> plain-text data) are what ``envFrom`` and
    ``valueFrom`` refer to, in any namespace. A pod that names a missing one stays Pending with
    CreateContainerConfigError. A pod's process is killed after ``pod_timeout_s``.
    """

    url: str
    kubeconfig: Path

    def __init__(
        self,
        folder: Path,
        executables: dict[str, str] | None = None,
        config_maps: dict[str, dict[str, str]] | None = None,
        secrets: dict[str, dict[str, str]] | None = None,
        pod_timeout_s: float = 120,
    ) -> None:
        self.folder = folder
        self.executables = executables or {}
        self.config_maps = config_maps or {}
        self.secrets = secrets or {}
        self.pod_timeout_s = pod_timeout_s
        self.pods: dict[str, dict] = {}
        self._live: dict[tuple[str, str], Pod] = {}  # (namespace, name) -> pods not deleted yet
        self._all: dict[str, Pod] = {}
        prefix = "/api/v1/namespaces/{ns}"
        self._app = Starlette(
            routes=[
                Route("/version", self._version),
                Route("/api", self._api),
                Route(f"{prefix}/pods", self._list, methods=["GET"]),
                Route(f"{prefix}/pods", self._create, methods=["POST"]),
                Route(f"{prefix}/pods/{{name}}", self._pod, methods=["GET", "PATCH", "DELETE"]),
                Route(f"{prefix}/pods/{{name}}/log", self._log),
                Route(f"{prefix}/events", self._events),
                WebSocketRoute(f"{prefix}/pods/{{name}}/exec", self._exec),
            ]
        )

    def __enter__(self) -> FakeKubernetes:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.kubeconfig = self.folder / "kubeconfig.yaml"
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }  # fmt: skip
        self.kubeconfig.write_text(json.dumps(kubeconfig))  # JSON is YAML
        config = uvicorn.Config(
            self._app, loop="asyncio", ws="websockets-sansio", lifespan="off", log_level="warning",
            access_log=False, timeout_graceful_shutdown=2,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [listener]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake Kubernetes API server did not start")
            time.sleep(0.01)
        self._listener = listener
        return self

    def __exit__(self, *exc_info: object) -> None:
        pods = list(self._all.values())
        for pod in pods:
            pod.kill()
        for pod in pods:
            if pod.follower is not None:
                pod.follower.join(timeout=10)
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._listener.close()

    def connection(self, namespace: str = "default") -> str:
        """An AIRFLOW_CONN_<ID> value (JSON) for the cncf.kubernetes hook, pointing at this server."""
        extra = {"kube_config_path": str(self.kubeconfig), "namespace": namespace}
        return json.dumps({"conn_type": "kubernetes", "extra": extra})

    def env_of(self, name: str) -> dict[str, str]:
        """The environment the pod's process got."""
        return self._all[name].env

    def exit_code(self, name: str) -> int | None:
        """The pod's base container exit code; None while it has not ended."""
        return self._all[name].base.get("terminated", {}).get("exitCode")

    # The API

    async def _version(self, request: Request) -> JSONResponse:
        version = {
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "", "goVersion": "",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "compiler": "gc",
            "platform": "linux/amd64",
        }  # fmt: skip
        return JSONResponse(version)

    async def _api(self, request: Request) -> JSONResponse:
        return JSONResponse({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})

    def _find(self, request: Request) -> Pod | None:
        return self._live.get((request.path_params["ns"], request.path_params["name"]))

    def _missing(self, request: Request) -> JSONResponse:
        return _failure(404, "NotFound", f'pods "{request.path_params["name"]}" not found')

    async def _create(self, request: Request) -> JSONResponse:
        posted = await request.json()
        namespace, name = request.path_params["ns"], posted["metadata"]["name"]
        if (namespace, name) in self._live:
            return _failure(409, "AlreadyExists", f'pods "{name}" already exists')
        container = next((c for c in posted["spec"]["containers"] if c["name"] == BASE), None)
        if container is None or not container.get("command"):
            message = f"the fake runs a container named {BASE} with a command (it has no image entrypoints)"
            return _failure(422, "Invalid", message)
        self.pods[name] = copy.deepcopy(posted)
        body = copy.deepcopy(posted)
        body["metadata"].update(
            namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion="1"
        )
        pod = Pod(body, self.folder / "pods" / name)
        self._live[(namespace, name)] = self._all[name] = pod
        try:
            env = environment(container, self.config_maps, self.secrets)
        except ContainerConfigError as error:
            pod.fail_to_start(str(error))
        else:
            pod.start(container, self.executables, env, self.pod_timeout_s)
        return JSONResponse(pod.view(), 201)

    async def _list(self, request: Request) -> JSONResponse:
        namespace, selector = request.path_params["ns"], request.query_params.get("labelSelector", "")
        items = [
            pod.view()
            for (ns, _), pod in self._live.items()
            if ns == namespace and selected(pod.body["metadata"].get("labels", {}), selector)
        ]
        return JSONResponse({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})

    async def _pod(self, request: Request) -> JSONResponse:
        pod = self._find(request)
        if pod is None:
            return self._missing(request)
        if request.method == "PATCH":
            merge(pod.body, await request.json())
        elif request.method == "DELETE":
            pod.kill()
            del self._live[(request.path_params["ns"], request.path_params["name"])]
        return JSONResponse(pod.view())

    async def _log(self, request: Request) -> Response:
        """The base container's output; when following, the stream ends once the container has."""
        pod = self._find(request)
        if pod is None:
            return self._missing(request)
        if request.query_params.get("container", BASE) != BASE:
            return Response(b"", media_type="text/plain")
        if "waiting" in pod.base:
            message = f'container "{BASE}" in pod "{request.path_params["name"]}" is waiting to start'
            return _failure(400, "BadRequest", message)
        follow, stamped = flag(request.query_params, "follow"), flag(request.query_params, "timestamps")

        async def lines():
            sent = 0
            while True:
                ended = "terminated" in pod.base or not follow  # read before the lines: none is missed
                new = pod.log[sent:]
                sent += len(new)
                if new:
                    yield b"".join(f"{at} ".encode() + line if stamped else line for at, line in new)
                if ended:
                    return
                await asyncio.sleep(0.05)

        return StreamingResponse(lines(), media_type="text/plain")

    async def _events(self, request: Request) -> JSONResponse:
        return JSONResponse({"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": []})

    async def _exec(self, websocket: WebSocket) -> None:
        """Exec in a pod, as the operator uses it on its XCom sidecar.

        A command with stdin is the operator's shell that kills the sidecar: whatever it writes is
        taken as that signal, never run here. A command without stdin (``sh -c`` reading the xcom
        volume) runs locally, ``/airflow/xcom`` pointing at the pod's folder.
        """
        pod = self._live.get((websocket.path_params["ns"], websocket.path_params["name"]))
        if pod is None:
            await websocket.close()
            return
        await websocket.accept(subprotocol=EXEC_PROTOCOL)
        query = websocket.query_params
        if flag(query, "stdin"):
            await websocket.receive()
            pod.stopped[query["container"]] = _now()
            code = 0
        else:
            command = [part.replace(XCOM_PATH, str(pod.xcom)) for part in query.getlist("command")]
            env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]}
            done = await asyncio.to_thread(subprocess.run, command, capture_output=True, env=env, timeout=30)
            for channel, data in ((STDOUT, done.stdout), (STDERR, done.stderr)):
                if data:
                    await websocket.send_bytes(channel + data)
            code = done.returncode
        status = {"metadata": {}, "status": "Success"}
        if code:
            cause = {"reason": "ExitCode", "message": str(code)}
            status.update(status="Failure", reason="NonZeroExitCode", details={"causes": [cause]})
        await websocket.send_bytes(STATUS + json.dumps(status).encode())
        await websocket.close()
