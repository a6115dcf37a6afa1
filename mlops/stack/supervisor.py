"""The embedded stack's process supervisor: start, check and stop the services of services.py.

Every service runs detached in its own session, writes to ``<state_dir>/logs/<service>.log`` and
is recorded in ``<state_dir>/run/<service>.json`` (pid, process group, start time). ``down`` stops
exactly the processes recorded there (their whole process trees), and nothing else: a pid that has
been reused by another program since is recognised by its start time and left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from common.errors import ConfigError, StackError
from common.settings import Settings, env_name
from mlops.stack.services import HEALTHY, Component, Service, airflow_login

Progress = Callable[[str], None]
WATCHDOG = "watchdog"
_POLL_S = 0.5
_LOG_TAIL_LINES = 8


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ProcessRecord:
    """What the run file of a started service holds."""

    service: str
    pid: int
    pgid: int
    create_time: float
    argv: list[str]
    log: str
    started_at: float

    def process(self) -> psutil.Process | None:
        """The live process this record describes, or None if it exited or the pid was reused."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None


@dataclass
class ServiceStatus:
    name: str
    state: str  # running | stopped | exited
    health: str  # healthy, or what is missing
    pid: int | None = None
    log: str | None = None


@dataclass
class ComponentStatus:
    name: str
    url: str | None
    healthy: bool
    services: dict[str, ServiceStatus] = field(default_factory=dict)


@dataclass
class StackStatus:
    state_dir: str
    healthy: bool
    components: dict[str, ComponentStatus]
    airflow_login: dict[str, str] | None = None
    started: list[str] = field(default_factory=list)
    already_running: list[str] = field(default_factory=list)
    watchdog: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StoppedService:
    name: str
    pid: int
    processes: int  # how many processes of its tree were stopped
    forced: bool  # SIGKILL was needed


@dataclass
class DownResult:
    state_dir: str
    stopped: list[StoppedService]
    already_stopped: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


class Supervisor:
    """Starts, checks and stops the stack's services for one state dir."""

    def __init__(
        self,
        settings: Settings,
        components: tuple[Component, ...],
        progress: Progress = _stderr,
    ) -> None:
        self.settings = settings
        self.components = components
        self.progress = progress
        self.state_dir = settings.state_dir
        self.run_dir = self.state_dir / "run"
        self.log_dir = self.state_dir / "logs"

    # --- up ---------------------------------------------------------------------------------

    def up(self, ttl_s: float | None = None) -> StackStatus:
        """Start what is not running, wait until every component is healthy, return the status."""
        self._ensure_state_dir()
        running = {name for name, rec in self._records().items() if rec.process() is not None}
        to_start = [c for c in self.components if any(s.name not in running for s in c.long_running)]
        self._check_environments(to_start)
        self._check_ports([s for c in to_start for s in c.long_running if s.name not in running])

        started: list[str] = []
        for component in to_start:
            for service in component.services:
                if service.prepare is not None:
                    service.prepare()
            for service in component.services:
                if service.oneshot:
                    self._run_oneshot(service, component.health_timeout_s)
                elif service.name not in running:
                    self._spawn(service)
                    started.append(service.name)
        already = sorted(s.name for c in self.components for s in c.long_running if s.name in running)
        for name in already:
            self.progress(f"{name}: already running")

        watchdog = self._start_watchdog(ttl_s) if ttl_s is not None else None
        status = self._wait_healthy()
        status.started, status.already_running = started, already
        status.watchdog = watchdog
        return status

    def _ensure_state_dir(self) -> None:
        setting = env_name(("state_dir",))
        path = self.state_dir
        if path.exists() and not path.is_dir():
            raise ConfigError(f"state dir '{path}' ({setting}) exists and is not a directory")
        try:
            for folder in (path, self.run_dir, self.log_dir):
                folder.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"state dir '{path}' ({setting}) is not usable: {reason}") from exc

    def _check_environments(self, components: Iterable[Component]) -> None:
        for component in components:
            for service in component.services:
                executable = Path(service.argv[0])
                if not (executable.is_file() and os.access(executable, os.X_OK)):
                    venv = executable.parent.parent
                    raise ConfigError(
                        f"{component.name}: environment '{venv}' ({service.environment_setting}) is missing"
                        f" '{executable.name}' ({executable} not found); run `make setup`"
                    )

    def _check_ports(self, services: Iterable[Service]) -> None:
        seen: dict[int, Service] = {}
        for service in services:
            if service.port is None:
                continue
            if service.port in seen:
                other = seen[service.port]
                raise ConfigError(
                    f"port {service.port} is set for both {other.name} ({other.port_setting}) and"
                    f" {service.name} ({service.port_setting})"
                )
            seen[service.port] = service
            holder = port_holder(self.settings.host, service.port)
            if holder is not None:
                raise ConfigError(
                    f"port {service.port} for {service.name} ({service.port_setting}) is already in use"
                    f" on {self.settings.host}{holder}; free it or choose another port"
                )

    def _run_oneshot(self, service: Service, timeout_s: float) -> None:
        self.progress(f"{service.name}: running")
        log = self._open_log(service)
        started = time.monotonic()
        proc = subprocess.Popen(
            self._run_command(service), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.state_dir, start_new_session=True,
        )  # fmt: skip
        log.close()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            raise StackError(
                f"{service.name} did not finish within {timeout_s:.0f} s; log: {self._log_path(service)}"
            ) from None
        if code != 0:
            self._show_log_tail(service)
            raise StackError(f"{service.name} failed (exit {code}); log: {self._log_path(service)}")
        self.progress(f"{service.name}: done in {time.monotonic() - started:.1f} s")

    def _spawn(self, service: Service) -> ProcessRecord:
        log = self._open_log(service)
        argv = self._run_command(service)
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.state_dir, start_new_session=True,
        )  # fmt: skip
        log.close()
        record = ProcessRecord(
            service=service.name,
            pid=proc.pid,
            pgid=proc.pid,  # start_new_session makes it the leader of its own group
            create_time=psutil.Process(proc.pid).create_time(),
            argv=list(argv),
            log=str(self._log_path(service)),
            started_at=time.time(),
        )
        self._write_record(record)
        self.progress(f"{service.name}: started (pid {proc.pid}, log {record.log})")
        return record

    def _run_command(self, service: Service) -> list[str]:
        # The same command the compose file runs: `mlops stack run <service>` execs the service.
        return [sys.executable, "-m", "mlops", "stack", "run", service.name]

    def _start_watchdog(self, ttl_s: float) -> dict[str, float]:
        old = self._records().get(WATCHDOG)
        if old is not None:
            self._stop([old])
        log = (self.log_dir / f"{WATCHDOG}.log").open("ab")
        argv = [sys.executable, "-m", "mlops", "stack", "down", "--after-s", str(ttl_s)]
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.state_dir,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        self._write_record(
            ProcessRecord(
                service=WATCHDOG, pid=proc.pid, pgid=proc.pid,
                create_time=psutil.Process(proc.pid).create_time(), argv=argv,
                log=str(self.log_dir / f"{WATCHDOG}.log"), started_at=time.time(),
            )
        )  # fmt: skip
        self.progress(f"{WATCHDOG}: the stack stops itself in {ttl_s:.0f} s (pid {proc.pid})")
        return {"pid": proc.pid, "stops_at": time.time() + ttl_s}

    def _wait_healthy(self) -> StackStatus:
        begun = time.monotonic()
        pending = {c.name for c in self.components if c.probe is not None}
        last_report = begun
        with httpx.Client(timeout=5.0) as client:
            while True:
                status = self._status(client)
                for name in sorted(pending):
                    component = status.components[name]
                    if component.healthy:
                        pending.discard(name)
                        self.progress(
                            f"{name}: healthy at {component.url} ({time.monotonic() - begun:.1f} s)"
                        )
                        continue
                    self._fail_if_dead(component)
                    if time.monotonic() - begun > self._component(name).health_timeout_s:
                        self._fail_unhealthy(component, time.monotonic() - begun)
                if not pending:
                    return status
                if time.monotonic() - last_report >= 10:
                    last_report = time.monotonic()
                    for name in sorted(pending):
                        waiting = {
                            s.name: s.health for s in status.components[name].services.values()
                            if s.health != HEALTHY
                        }  # fmt: skip
                        self.progress(f"{name}: waiting ({time.monotonic() - begun:.0f} s): {waiting}")
                time.sleep(_POLL_S)

    def _fail_if_dead(self, component: ComponentStatus) -> None:
        for service in component.services.values():
            if service.state != "running":
                self._show_log_tail(self._service(service.name))
                raise StackError(
                    f"{service.name} {service.state} while starting; log: {service.log}"
                    " (run `mlops stack down` to stop the rest)"
                )

    def _fail_unhealthy(self, component: ComponentStatus, waited_s: float) -> None:
        bad = [s for s in component.services.values() if s.health != HEALTHY]
        for service in bad:
            self._show_log_tail(self._service(service.name))
        details = "; ".join(f"{s.name}: {s.health} (log: {s.log})" for s in bad)
        raise StackError(
            f"{component.name} did not become healthy within {waited_s:.0f} s: {details}"
            " (run `mlops stack down` to stop the rest)"
        )

    # --- status -----------------------------------------------------------------------------

    def status(self) -> StackStatus:
        with httpx.Client(timeout=5.0) as client:
            return self._status(client)

    def _status(self, client: httpx.Client) -> StackStatus:
        records = self._records()
        components: dict[str, ComponentStatus] = {}
        for component in self.components:
            services = component.long_running
            states: dict[str, ServiceStatus] = {}
            for service in services:
                record = records.get(service.name)
                if record is None:
                    states[service.name] = ServiceStatus(service.name, "stopped", "not running")
                elif record.process() is None:
                    states[service.name] = ServiceStatus(
                        service.name, "exited", "not running", record.pid, record.log
                    )
                else:
                    states[service.name] = ServiceStatus(service.name, "running", "", record.pid, record.log)
            if any(s.state == "running" for s in states.values()) and component.probe is not None:
                answers = component.probe(client)
                for name, state in states.items():
                    if state.state == "running":
                        state.health = answers.get(name, "unknown")
            healthy = all(s.health == HEALTHY for s in states.values())
            components[component.name] = ComponentStatus(component.name, component.url, healthy, states)
        healthy = all(c.healthy for c in components.values())
        watchdog = records.get(WATCHDOG)
        return StackStatus(
            state_dir=str(self.state_dir),
            healthy=healthy,
            components=components,
            airflow_login=airflow_login(self.settings) if _is_healthy(components.get("airflow")) else None,
            watchdog={"pid": watchdog.pid} if watchdog is not None and watchdog.process() else None,
        )

    # --- down -------------------------------------------------------------------------------

    def down(self, after_s: float | None = None) -> DownResult:
        """Stop every process this state dir's run files record; after ``after_s`` if given."""
        if after_s is not None:
            time.sleep(after_s)
            self.progress(f"{WATCHDOG}: {after_s:.0f} s are up, stopping the stack")
        records = self._records()
        # Reverse start order: Airflow before MLflow, the watchdog last (unless it is us).
        ordered = sorted(records.values(), key=lambda r: r.started_at, reverse=True)
        ordered = [r for r in ordered if r.pid != os.getpid()]
        alive = [r for r in ordered if r.process() is not None]
        gone = sorted(r.service for r in ordered if r.process() is None)
        stopped = self._stop(alive)
        for record in records.values():
            self._record_path(record.service).unlink(missing_ok=True)
        for service in stopped:
            self.progress(
                f"{service.name}: stopped ({service.processes} processes{', forced' if service.forced else ''})"
            )
        return DownResult(str(self.state_dir), stopped, gone)

    def _stop(self, records: list[ProcessRecord]) -> list[StoppedService]:
        families: dict[str, list[psutil.Process]] = {}
        for record in records:
            proc = record.process()
            if proc is None:
                continue
            family = [proc, *_children(proc)]
            families[record.service] = family
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pgid, signal.SIGTERM)
            for member in family:
                with contextlib.suppress(psutil.Error):
                    member.terminate()
        everyone = [p for family in families.values() for p in family]
        _, alive = psutil.wait_procs(everyone, timeout=self.settings.stop_timeout_s)
        for member in alive:
            with contextlib.suppress(psutil.Error):
                member.kill()
        psutil.wait_procs(alive, timeout=5)
        forced = {p.pid for p in alive}
        return [
            StoppedService(
                name=record.service,
                pid=record.pid,
                processes=len(families.get(record.service, [])),
                forced=any(p.pid in forced for p in families.get(record.service, [])),
            )
            for record in records
            if record.service in families
        ]

    # --- files ------------------------------------------------------------------------------

    def _records(self) -> dict[str, ProcessRecord]:
        records = {}
        if not self.run_dir.is_dir():
            return records
        for path in sorted(self.run_dir.glob("*.json")):
            try:
                records[path.stem] = ProcessRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                self.progress(f"ignoring unreadable run file {path}")
        return records

    def _record_path(self, service: str) -> Path:
        return self.run_dir / f"{service}.json"

    def _write_record(self, record: ProcessRecord) -> None:
        path = self._record_path(record.service)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(path)

    def _log_path(self, service: Service) -> Path:
        return self.log_dir / f"{service.name}.log"

    def _open_log(self, service: Service):
        # Private: a service may write secrets there (Airflow prints the passwords it generates).
        log = os.fdopen(os.open(self._log_path(service), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        log.write(f"\n=== mlops stack: starting {service.name} at {time.ctime()}\n".encode())
        log.flush()
        return log

    def _show_log_tail(self, service: Service) -> None:
        try:
            lines = self._log_path(service).read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        except OSError:
            return
        self.progress(f"--- last lines of {self._log_path(service)}:")
        for line in lines:
            self.progress(f"    {line}")

    def _component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def _service(self, name: str) -> Service:
        return next(s for c in self.components for s in c.services if s.name == name)


def port_holder(host: str, port: int) -> str | None:
    """None if ``host:port`` can be bound; else a short note on who holds it ('' if unknown)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return None
        except OSError:
            pass
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" by pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    return ""


def _is_healthy(component: ComponentStatus | None) -> bool:
    return component is not None and bool(component.healthy)


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        for member in [*_children(proc), proc]:
            with contextlib.suppress(psutil.Error):
                member.kill()
