"""Where jobs run: a given Ray cluster, or the embedded local one on 127.0.0.1.

The embedded default is a Ray head started with ``ray start`` on loopback only, with the
dashboard (Ray Jobs API) and token authentication on; it outlives the process that
started it, so the next ``napari-raysam train`` (or a napari restart) reuses it. Its
address, token and temp folder are recorded in ``local_cluster.json`` in the state
folder (``$NAPARI_RAYSAM_HOME``, default ``~/.cache/napari-raysam``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from napari_raysam.auth import ensure_token_file, warn_if_token_in_clear

DEFAULT_DASHBOARD_PORT = 8265


class ClusterError(RuntimeError):
    """The cluster cannot be reached or started; the message says what to do."""


@dataclass(frozen=True)
class Cluster:
    """How to reach a Ray cluster's Jobs API."""

    dashboard_url: str
    """``http://host:port`` of the Ray dashboard (Jobs API)."""
    token: str | None = field(default=None, repr=False)
    """Ray auth token sent as ``Authorization: Bearer``; None sends none."""
    temp_dir: str | None = None
    """Set for the embedded local cluster: its processes are found by this folder ..."""
    gcs_address: str | None = None
    """... or by its GCS address (``127.0.0.1:port``), which the Ray Client server names."""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def is_local(self) -> bool:
        return self.temp_dir is not None


def default_cpus_per_worker(workers: int, local: bool) -> int:
    """CPU cores per Ray Train worker (its PyTorch threads): this computer's cores shared by the
    workers on the embedded cluster; 1 on a given cluster, whose node sizes are unknown here."""
    return max(1, (os.cpu_count() or 1) // workers) if local else 1


def state_dir() -> Path:
    return Path(os.environ.get("NAPARI_RAYSAM_HOME", Path.home() / ".cache" / "napari-raysam"))


def _state_file() -> Path:
    return state_dir() / "local_cluster.json"


def read_token(token: str | None = None) -> str | None:
    """The token to send: the given one, else ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            return Path(path).read_text().strip()
    return None


def connect(address: str, token: str | None = None, timeout: float = 10.0) -> Cluster:
    """Check that ``address`` (``http://host:8265``, ``host:8265`` or ``host``) answers as a Ray dashboard.

    Raises ClusterError naming the cause: nothing listening, not a Ray dashboard, missing
    or wrong token.
    """
    url = address if "://" in address else f"http://{address}"
    if url.startswith("ray://"):
        raise ClusterError(
            "ray:// (Ray Client) addresses are not supported: give the dashboard address instead, "
            f"e.g. http://<head>:{DEFAULT_DASHBOARD_PORT}"
        )
    if url.count(":") == 1:  # no port given
        url = f"{url}:{DEFAULT_DASHBOARD_PORT}"
    cluster = Cluster(dashboard_url=url.rstrip("/"), token=read_token(token))
    warn_if_token_in_clear(cluster.dashboard_url, cluster.token)
    check(cluster, timeout=timeout)
    return cluster


def check(cluster: Cluster, timeout: float = 10.0) -> dict:
    """GET the Jobs API's version endpoint; returns its JSON or raises ClusterError."""
    request = urllib.request.Request(f"{cluster.dashboard_url}/api/version", headers=cluster.headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code == 401:
            raise ClusterError(
                f"the Ray cluster at {cluster.dashboard_url} requires a token: pass --token, set RAY_AUTH_TOKEN, "
                "or copy the cluster's token file (ray get-auth-token) to ~/.ray/auth_token"
            ) from error
        if error.code == 403:
            raise ClusterError(
                f"the Ray cluster at {cluster.dashboard_url} rejected the token: it is wrong or outdated; "
                "get the current one from the cluster admin (ray get-auth-token)"
            ) from error
        raise ClusterError(f"{cluster.dashboard_url} answered HTTP {error.code}: is it a Ray dashboard?") from error
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as error:
        reason = getattr(error, "reason", error)
        raise ClusterError(
            f"cannot reach a Ray cluster at {cluster.dashboard_url} ({reason}). Check the address and port "
            f"(the dashboard port, {DEFAULT_DASHBOARD_PORT} by default), that the cluster is up, and the network "
            "path (VPN, port-forward for KubeRay: kubectl port-forward svc/<cluster>-head-svc 8265)."
        ) from error


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_executable() -> str:
    """The ``ray`` command of this interpreter's environment (for ``ray start``, e.g. a node joining the cluster)."""
    candidate = Path(sys.executable).parent / "ray"
    found = str(candidate) if candidate.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("the 'ray' command is missing: install napari-raysam with its dependencies")
    return found


def local_environment(token_path: Path) -> dict[str, str]:
    """Environment of the embedded cluster's processes: loopback-only ports, token auth from our file,
    and this interpreter first on PATH so that jobs' ``python`` is the one with napari-raysam installed."""
    # Ray prefers $RAY_AUTH_TOKEN to the token file: a user's (for another cluster) would make the head
    # reject the file's token that our client sends.
    return {
        **{name: value for name, value in os.environ.items() if name != "RAY_AUTH_TOKEN"},
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps every Ray port on 127.0.0.1
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def recorded_local_cluster() -> Cluster | None:
    """The embedded cluster recorded in the state folder, whether it still answers or not."""
    try:
        recorded = json.loads(_state_file().read_text())
        token = Path(recorded["token_path"]).read_text().strip()
    except (OSError, ValueError, KeyError):
        return None
    return Cluster(
        dashboard_url=recorded["dashboard_url"], token=token,
        temp_dir=recorded["temp_dir"], gcs_address=recorded["gcs_address"],
    )


def running_local_cluster() -> Cluster | None:
    """The embedded cluster recorded in the state folder, if it still answers."""
    cluster = recorded_local_cluster()
    if cluster is None:
        return None
    try:
        check(cluster, timeout=3)
    except ClusterError:
        return None
    return cluster


def start_local_cluster(num_cpus: int | None = None, num_gpus: int | None = None, timeout: float = 120.0) -> Cluster:
    """Reuse the embedded local Ray cluster or start one on 127.0.0.1; returns once its Jobs API answers.

    Raises:
        ClusterError: the recorded cluster does not answer but its processes run (busy, or its
            dashboard died): a second one beside it would leave those running, unrecorded.
    """
    cluster = running_local_cluster()
    if cluster is not None:
        return cluster
    recorded = recorded_local_cluster()
    if recorded is not None and local_cluster_processes(recorded):
        raise ClusterError(
            f"the local Ray cluster (dashboard {recorded.dashboard_url}) runs but does not answer: it may "
            "be busy, so try again in a minute; if it still does not answer, `napari-raysam cluster stop` "
            "stops it, and the next run starts a new one"
        )
    home = state_dir()
    home.mkdir(parents=True, exist_ok=True)
    token_path = home / "auth_token"
    token = ensure_token_file(token_path)
    # Ray's unix sockets live in temp_dir and their paths must stay short (< 108 bytes).
    temp_dir = tempfile.mkdtemp(prefix="nrs-", dir="/tmp")
    dashboard_port, gcs_port = _free_port(), _free_port()
    command = [
        ray_executable(), "start", "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    result = subprocess.run(
        command, env=local_environment(token_path), capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise ClusterError(f"starting the local Ray cluster failed:\n{result.stderr[-2000:]}")
    cluster = Cluster(
        dashboard_url=f"http://127.0.0.1:{dashboard_port}", token=token,
        temp_dir=temp_dir, gcs_address=f"127.0.0.1:{gcs_port}",
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            check(cluster, timeout=3)
            break
        except ClusterError:
            if time.monotonic() > deadline:
                stop_local_cluster(cluster)
                raise ClusterError(
                    f"the local Ray cluster started but its dashboard did not answer within {timeout:.0f} s; "
                    f"see the logs in {temp_dir}/session_latest/logs"
                )
            time.sleep(0.5)
    record_local_cluster(cluster, token_path)
    return cluster


def record_local_cluster(cluster: Cluster, token_path: Path) -> None:
    """Record ``cluster`` (its token in ``token_path``) as the embedded one of the state folder, so that
    ``running_local_cluster`` (and so the dock and the CLI without an address) finds and reuses it."""
    state = {
        "dashboard_url": cluster.dashboard_url, "temp_dir": cluster.temp_dir,
        "gcs_address": cluster.gcs_address, "token_path": str(token_path),
    }
    _state_file().write_text(json.dumps(state))


# `ray start --address` refuses to join a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the setting that
# keeps our ports on 127.0.0.1. In Ray the setting does just two things: that refusal, and a node IP of
# 127.0.0.1 (`services.get_node_ip_address`). This runs `ray start` with the refusal lifted and the
# loopback IP kept; the node's own processes get the setting from the environment, as the head's do.
_START_ON_LOOPBACK = (
    "import sys; import ray._private.ray_constants as constants, ray._private.services as services; "
    "from ray._common.network_utils import get_localhost_ip; "
    "constants.ENABLE_RAY_CLUSTER = True; services.get_node_ip_address = lambda address=None: get_localhost_ip(); "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"
)


def add_local_node(cluster: Cluster, num_cpus: int, timeout: float = 120.0) -> None:
    """Join one more Ray node on this computer to the embedded ``cluster``: a raylet, object store and
    ``num_cpus`` of its own, every port on 127.0.0.1, the cluster's token. For trying a multi-node layout
    (Ray Train's workers on different nodes, DDP between them) on one machine; ``stop_local_cluster``
    stops it with the rest (its processes name the cluster's GCS address)."""
    if not cluster.gcs_address:
        raise ClusterError("a node can join only the embedded cluster started on this computer")
    command = [
        sys.executable, "-c", _START_ON_LOOPBACK, "start", f"--address={cluster.gcs_address}",
        "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
        f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats",
    ]
    # its daemons keep the output pipes open after `ray start` returns: a log file, not a pipe
    with tempfile.TemporaryFile("w+") as output:
        result = subprocess.run(
            command, env=local_environment(state_dir() / "auth_token"), stdout=output, stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        if result.returncode != 0:
            output.seek(0)
            raise ClusterError(f"adding a node to the local Ray cluster failed:\n{output.read()[-2000:]}")


def local_cluster_processes(cluster: Cluster) -> list[psutil.Process]:
    """Processes of the embedded cluster: those whose command line names its temp folder or GCS address,
    and their children."""
    if not cluster.temp_dir:
        return []
    markers = [m for m in (cluster.temp_dir, cluster.gcs_address) if m]
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if process.pid == os.getpid():  # the caller's own command line may name the folder too
            continue
        try:
            if any(m in part for part in process.info["cmdline"] or () for m in markers):
                found[process.pid] = process
                found.update((child.pid, child) for child in process.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def stop_local_cluster(cluster: Cluster, timeout: float = 15.0) -> int:
    """Stop the embedded cluster by the ids of its own processes; returns how many were stopped."""
    processes = local_cluster_processes(cluster)
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    try:
        recorded = json.loads(_state_file().read_text())
        if recorded.get("temp_dir") == cluster.temp_dir:
            _state_file().unlink()
    except (OSError, ValueError):
        pass
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    return len(processes)
