"""A local cluster as child processes: the control plane and node agents on this machine.

`LocalCluster` runs `pecsched db upgrade`, starts `pecsched controlplane`, any number of
`pecsched agent`s and optionally `pecsched gateway` (the OpenAI HTTP endpoint), each as
`sys.executable -m pecsched ...` in its own process group so that its worker processes go with
it; waits until the agents' instances are registered; and stops everything: SIGTERM, a grace
period, then SIGKILL of the whole group. `pecsched up` and the end-to-end tests both use it.
Each child's stdout and stderr go to `<log_dir>/<name>.log`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pecsched.orphans import PARENT_PID_ENV

STOP_GRACE_S = 10.0  # SIGTERM -> SIGKILL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """One node agent: its workers and model."""

    node_id: str  # unique per agent on this machine
    roles: tuple[str, ...]  # one role per worker
    model: str = "tiny"  # preset or local HF directory
    device: str = "cpu"  # cpu or cuda
    kv_budget: str | None = None  # per worker, TOKENS or a size; None: the agent's default
    seed: int = 0  # weight seed of presets
    extra_args: tuple[str, ...] = ()  # more `pecsched agent` flags


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The control plane's settings and the agents to start."""

    db_url: str  # e.g. sqlite:///pecsched.db
    port: int  # gRPC port of the control plane on 127.0.0.1
    policy: str = "pecsched"
    config_toml: str = ""  # contents of the control plane's --config file ("" = none)
    agents: tuple[AgentSpec, ...] = ()
    extra_controlplane_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every child
    tokenizer_dir: str | None = None  # served model's tokenizer, for the control plane
    http_port: int | None = None  # OpenAI gateway on 127.0.0.1:PORT (None: no gateway)
    model_name: str = "pecsched"  # the model id the gateway serves
    otlp_endpoint: str | None = None  # OTLP/gRPC collector of the control plane's and agents' spans

    @property
    def target(self) -> str:
        """The control plane's address for clients and agents."""
        return f"127.0.0.1:{self.port}"

    @property
    def num_instances(self) -> int:
        """Instances the agents register (one per worker)."""
        return sum(len(a.roles) for a in self.agents)


class ClusterError(RuntimeError):
    """A child failed to start or the cluster did not come up in time."""


class LocalCluster:
    """Start, inspect, kill and stop the processes of a `ClusterSpec`."""

    def __init__(self, spec: ClusterSpec, log_dir: Path, api_key: str | None = None) -> None:
        """Nothing starts until `start()`; logs go under `log_dir` (created); `api_key` is
        what this object's own calls (the readiness Watch) send."""
        self.spec = spec
        self.api_key = api_key
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.controlplane: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.gateway: subprocess.Popen[bytes] | None = None
        self._num_starts: dict[str, int] = {}

    # -- processes --------------------------------------------------------------------------

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        count = self._num_starts.get(name, 0)
        self._num_starts[name] = count + 1
        log_path = self.log_dir / (f"{name}.log" if count == 0 else f"{name}.{count}.log")
        # The child dies with this process (a SIGKILLed `up` or test runner leaves no orphans).
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            PARENT_PID_ENV: str(os.getpid()),
            **self.spec.env,
        }
        with open(log_path, "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "pecsched", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def log_tail(self, name: str, num_chars: int = 3000) -> str:
        """The end of the newest log of child `name` ("controlplane" or an agent's node id)."""
        logs = sorted(self.log_dir.glob(f"{name}*.log"), key=lambda p: p.stat().st_mtime)
        return logs[-1].read_text(errors="replace")[-num_chars:] if logs else ""

    def upgrade_db(self) -> None:
        """Run `pecsched db upgrade` on the spec's database (raises ClusterError on failure)."""
        done = subprocess.run(
            [sys.executable, "-m", "pecsched", "db", "upgrade", "--db", self.spec.db_url],
            capture_output=True,
            text=True,
            env={**os.environ, **self.spec.env},
        )
        if done.returncode != 0:
            raise ClusterError(f"pecsched db upgrade failed: {done.stderr.strip()}")

    def start_controlplane(self) -> None:
        """Start (or restart) the control plane process."""
        args = [
            "controlplane",
            "--db",
            self.spec.db_url,
            "--listen",
            self.spec.target,
            "--policy",
            self.spec.policy,
        ]
        if self.spec.tokenizer_dir is not None:
            args += ["--tokenizer", self.spec.tokenizer_dir]
        if self.spec.otlp_endpoint is not None:
            args += ["--otlp-endpoint", self.spec.otlp_endpoint]
        if self.spec.config_toml:
            config_path = self.log_dir / "controlplane.toml"
            config_path.write_text(self.spec.config_toml)
            args += ["--config", str(config_path)]
        self.controlplane = self._spawn("controlplane", [*args, *self.spec.extra_controlplane_args])

    def start_agent(self, agent: AgentSpec) -> None:
        """Start (or restart) one agent."""
        args = [
            "agent",
            "--controlplane",
            self.spec.target,
            "--device",
            agent.device,
            "--workers",
            str(len(agent.roles)),
            "--model",
            agent.model,
            "--roles",
            ",".join(agent.roles),
            "--node-id",
            agent.node_id,
            "--seed",
            str(agent.seed),
        ]
        if agent.kv_budget is not None:
            args += ["--kv-budget", agent.kv_budget]
        if self.spec.otlp_endpoint is not None:
            args += ["--otlp-endpoint", self.spec.otlp_endpoint]
        self.agents[agent.node_id] = self._spawn(agent.node_id, [*args, *agent.extra_args])

    def start_gateway(self, timeout_s: float = 30.0) -> None:
        """Start `pecsched gateway` on the spec's HTTP port and wait until it accepts."""
        assert self.spec.http_port is not None, "no http_port in the spec"
        args = ["gateway", "--target", self.spec.target, "--model-name", self.spec.model_name]
        self.gateway = self._spawn(
            "gateway", [*args, "--listen", f"127.0.0.1:{self.spec.http_port}"]
        )
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            try:
                socket.create_connection(("127.0.0.1", self.spec.http_port), 1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"gateway not listening after {timeout_s:.0f} s") from None
                time.sleep(0.1)

    def start(self, ready_timeout_s: float = 120.0) -> None:
        """Upgrade the database, start the control plane and every agent, wait until ready,
        then start the gateway (if the spec has an HTTP port)."""
        self.upgrade_db()
        self.start_controlplane()
        for agent in self.spec.agents:
            self.start_agent(agent)
        self.wait_ready(self.spec.num_instances, ready_timeout_s)
        if self.spec.http_port is not None:
            self.start_gateway()

    def restart_controlplane(self, policy: str, ready_timeout_s: float) -> None:
        """Stop the control plane (SIGTERM, then SIGKILL after the grace period), start it on
        the same database with `policy`, and wait until every agent's instances are back up.

        The agents and their workers keep running and re-attach on their own.
        """
        assert self.controlplane is not None, "control plane not started"
        _terminate(self.controlplane, STOP_GRACE_S)
        self.spec = dataclasses.replace(self.spec, policy=policy)
        self.start_controlplane()
        self.wait_ready(self.spec.num_instances, ready_timeout_s)

    def check_alive(self) -> None:
        """Raise ClusterError (with the log's end) if a started child has exited."""
        children = {"controlplane": self.controlplane, "gateway": self.gateway, **self.agents}
        for name, proc in children.items():
            if proc is not None and proc.poll() is not None:
                raise ClusterError(
                    f"{name} exited with code {proc.returncode}; end of its log:\n"
                    f"{self.log_tail(name)}"
                )

    def wait_ready(self, num_instances: int, timeout_s: float) -> None:
        """Wait until the control plane reports `num_instances` instances UP (Watch)."""
        from sdk.client import Client
        from sdk.errors import PecSchedError
        from sdk.types import InstanceState

        deadline = time.monotonic() + timeout_s
        last = "no snapshot yet"
        with Client(self.spec.target, api_key=self.api_key, timeout_s=5.0) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                try:
                    for snapshot in client.watch(interval_s=0.25, timeout_s=5.0):
                        up = [i for i in snapshot.instances if i.state is InstanceState.UP]
                        last = f"{len(up)} of {num_instances} instances up"
                        if len(up) >= num_instances:
                            return
                        self.check_alive()
                        if time.monotonic() > deadline:
                            break
                except PecSchedError as exc:
                    last = str(exc)
                    time.sleep(0.25)
        raise ClusterError(f"cluster not ready after {timeout_s:.0f} s: {last}")

    def kill_agent(self, node_id: str) -> None:
        """SIGKILL the agent's whole process group (agent and workers), like a node crash."""
        proc = self.agents[node_id]
        _signal_group(proc, signal.SIGKILL)
        proc.wait()

    def kill_controlplane(self) -> None:
        """SIGKILL the control plane."""
        assert self.controlplane is not None, "control plane not started"
        _signal_group(self.controlplane, signal.SIGKILL)
        self.controlplane.wait()

    def stop(self, grace_s: float = STOP_GRACE_S) -> dict[str, int]:
        """SIGTERM the gateway, each agent, then the control plane; after `grace_s` each, SIGKILL
        its group.

        Returns each child's exit code (negative: killed by that signal).
        """
        codes: dict[str, int] = {}
        if self.gateway is not None:
            codes["gateway"] = _terminate(self.gateway, grace_s)
        for name, proc in self.agents.items():
            codes[name] = _terminate(proc, grace_s)
        if self.controlplane is not None:
            codes["controlplane"] = _terminate(self.controlplane, grace_s)
        return codes


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session: pgid == pid
    except ProcessLookupError:
        pass


def _terminate(proc: subprocess.Popen[bytes], grace_s: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # the leader only: an agent drains its own workers
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group (the leader, or workers it left behind) goes now.
    _signal_group(proc, signal.SIGKILL)
    return proc.wait()
