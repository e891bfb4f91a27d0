"""Ray engine against an existing cluster by address (``fpstate campaign --address``): a
one-node cluster started inside the test with ``ray start --head``, as a user starts one.

The same bounded-exhaustive campaign gives, through the command line and the cluster (by
its GCS address, and as a Ray Client by ``ray://``), the states, transitions and violations
of one local process; an address with no cluster behind
it, or a malformed one, is a one-line error with exit status 2 (Ray itself would retry a
dead address for many minutes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray", reason="Ray is not installed (pip install 'fpstate[ray]')")

from fpstate.campaign.engines import LocalEngine, connect_error
from fpstate.campaign.runner import run_campaign

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """``ray start --head --block`` with 2 CPUs and a Ray Client server: yields (address,
    Ray Client address, environment of a driver, why no Ray Client session opened by the
    deadline or None)."""
    if not Path(RAY).exists():
        pytest.skip("the ray command is not installed")
    # Ray's socket paths must stay short: a temp dir of its own under /tmp.
    tmp = tempfile.mkdtemp(prefix="fpray", dir="/tmp")
    log = Path(tmp, "head.log")
    port, client_port = _free_port(), _free_port()
    with log.open("w") as out:
        head = subprocess.Popen(
            [RAY, "start", "--head", "--port", str(port), "--num-cpus", "2",
             "--ray-client-server-port", str(client_port),
             "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", tmp,
             "--block"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and head.poll() is None:
            m = re.search(r"ray start --address='([^']+)'", log.read_text())
            if m and "Ray runtime started" in log.read_text():
                address = m.group(1)
                break
            time.sleep(0.5)
        if address is None:
            pytest.fail(f"ray start --head did not come up:\n{log.read_text()[-2000:]}")
        env = dict(os.environ)
        if "Token authentication is enabled" in log.read_text():
            env["RAY_AUTH_MODE"] = "token"  # the token is in ~/.ray/auth_token
        # The Ray Client server is a process of its own: it listens a little after the head is
        # up, and on a loaded machine its first sessions may still fail to initialise. Wait
        # until a client session opens, as a user would before pointing a campaign at it. The
        # probe opens it as the campaign does (RayEngine): with fpstate's runtime_env, whose
        # session server waits for the head's runtime-env agent too (a session without one
        # does not, and opened while the agent was still not answering: CI, session 30).
        probe = ("import sys; from fpstate.campaign.engines import RayEngine; "
                 "RayEngine(address=sys.argv[1]).close()")
        client_error: str | None = f"nothing listened on port {client_port}"
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", client_port), 1).close()
            except OSError:
                time.sleep(0.5)
                continue
            run = subprocess.run([sys.executable, "-c", probe, f"ray://127.0.0.1:{client_port}"],
                                 env=env, capture_output=True, text=True, timeout=120,
                                 check=False)
            if run.returncode == 0:
                client_error = None
                break
            lines = run.stderr.strip().splitlines()
            client_error = f"ray.init() exited {run.returncode}: " + " | ".join(lines[-3:])
            time.sleep(1)
        yield address, f"ray://127.0.0.1:{client_port}", env, client_error
    finally:
        head.terminate()  # --block: the head stops the cluster's processes on SIGTERM
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(tmp, ignore_errors=True)


def _campaign_file(tmp_path: Path, campaigns) -> tuple[Path, object]:
    doc = yaml.safe_load((campaigns.root / "campaigns" / "small.yaml").read_text())
    doc["explore"] = {"mode": "exhaustive", "depth": 2}
    doc["matrix"]["variants"] = ["none", "pasid-write-incoherent"]
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, campaigns.small(2, ["none", "pasid-write-incoherent"])


def _fpstate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fpstate.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600, check=False)


def _same_as_one_process(address: str, env: dict[str, str], campaigns,
                         tmp_path: Path) -> list[dict]:
    """The small campaign through the command line at ``address``: its cells, checked equal
    to one local process's and run by the cluster's two workers."""
    path, campaign = _campaign_file(tmp_path, campaigns)
    one = run_campaign(campaign, LocalEngine(1), str(tmp_path / "one"))
    proc = _fpstate("campaign", str(path), "--address", address, "--json",
                    "--report", str(tmp_path / "cluster"), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cells = json.loads(proc.stdout)["cells"]
    assert campaigns.facts(cells) == campaigns.facts(one.cells)
    assert {c["engine"] for c in cells} == {f"ray (cluster {address}), 2 workers"}
    return cells


def test_a_campaign_on_a_cluster_by_address_equals_one_process(cluster, campaigns,
                                                                tmp_path: Path) -> None:
    address, _client, env, _ = cluster
    cells = _same_as_one_process(address, env, campaigns, tmp_path)
    assert [v["invariant"] for v in cells[1]["violations"]] == ["valid-registers-match-memory"]


def test_a_campaign_through_ray_client_equals_one_process(cluster, campaigns,
                                                          tmp_path: Path) -> None:
    """``--address ray://HOST:PORT``: the driver is a Ray Client of the cluster (its
    processes run on the cluster, not here), with the same results."""
    pytest.importorskip("grpc", reason="Ray Client needs ray[client] (pip install 'fpstate[ray]')")
    _address, client, env, client_error = cluster
    if client_error is not None:  # the cause, rather than the campaign's own failure
        pytest.fail(f"the Ray Client server at {client} opened no session by the "
                    f"fixture's deadline (120 s after ray start): {client_error}")
    _same_as_one_process(client, env, campaigns, tmp_path)


def test_an_address_with_no_cluster_is_a_one_line_error(tmp_path: Path, campaigns) -> None:
    path, _ = _campaign_file(tmp_path, campaigns)
    port = _free_port()  # nothing listens there
    proc = _fpstate("campaign", str(path), "--address", f"127.0.0.1:{port}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fpstate: error: cannot connect to the Ray cluster at 127.0.0.1:{port}: "
        "Connection refused")
    assert "Traceback" not in proc.stderr


def test_a_malformed_address_is_a_one_line_error(tmp_path: Path, campaigns) -> None:
    path, _ = _campaign_file(tmp_path, campaigns)
    proc = _fpstate("campaign", str(path), "--address", "head-node")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fpstate: error: bad Ray address 'head-node': expected "
                                   "HOST:PORT or ray://HOST:PORT")


def test_a_cluster_that_wants_a_token_we_lack_is_a_one_line_error(tmp_path: Path,
                                                                  campaigns) -> None:
    import ray

    major, minor = (int(x) for x in ray.__version__.split(".")[:2])
    if (major, minor) < (2, 52):
        pytest.skip(f"Ray {ray.__version__} has no token authentication (2.52 and later)")
    path, _ = _campaign_file(tmp_path, campaigns)
    with socket.socket() as listener:  # something answers at the address (as a cluster would)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        env = {**os.environ, "RAY_AUTH_MODE": "token", "HOME": str(tmp_path)}  # no token
        env.pop("RAY_AUTH_TOKEN", None)
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        proc = _fpstate("campaign", str(path), "--address", f"127.0.0.1:{port}", env=env)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fpstate: error: cannot connect to the Ray cluster at "
                           f"127.0.0.1:{port}: Token authentication is enabled but no "
                           "authentication token was found")
    assert "Traceback" not in proc.stderr


def test_a_client_session_refused_by_the_server_names_the_cause() -> None:
    """Ray Client's "Initialization failure from server:" is followed by the server's
    traceback; the one-line error gives its last line, and no token hint (the connection and
    its token were accepted)."""
    refused = ConnectionAbortedError(
        "Initialization failure from server:\nTraceback (most recent call last):\n"
        '  File "proxier.py", line 764, in Datapath\n'
        "RuntimeError: Starting Ray client server failed. See ray_client_server_23001.err "
        "for detailed logs.\n")
    assert connect_error("ray://10.0.0.1:10001", refused) == (
        "cannot connect to the Ray cluster at ray://10.0.0.1:10001: the Ray Client server "
        "refused the session: RuntimeError: Starting Ray client server failed. See "
        "ray_client_server_23001.err for detailed logs.")
    bare = ConnectionAbortedError("Initialization failure from server:\n")
    assert connect_error("ray://10.0.0.1:10001", bare).endswith(
        "refused the session: no reason given")
    # Any other failure keeps Ray's first line, and for an address the token hint.
    other = connect_error("10.0.0.1:6379", ConnectionError("GCS did not answer\nmore"))
    assert other.startswith("cannot connect to the Ray cluster at 10.0.0.1:6379: GCS did not "
                            "answer (a cluster started with token authentication")
    assert connect_error(None, ValueError("")) == ("cannot connect to a local Ray instance: "
                                                   "ValueError")
