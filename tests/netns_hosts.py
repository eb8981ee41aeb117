"""Two machines on one: Linux network namespaces joined by a veth pair, each with its own address and working
folder, and one torchrun per namespace as two real hosts would run it (tests/test_two_hosts.py).

The namespaces need root and iproute2's `ip`: without them a test fails under CI (CI set) and is skipped
elsewhere. Every namespace (with its veth end) and every process started here is removed afterwards.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import one_thread_env, write_driver

# Every pair of hosts is a network of its own (10.231.N.0/24, N per pair): namespaces made here start with no
# listening socket, so the rendezvous port is free in them whatever runs on this machine.
SUBNET, PORT = "10.231", 29400
TAG = f"kd{os.getpid()}"  # names unique to this test run (a veth name may have 15 characters at most)
JOB_SECONDS = 300          # any job here takes well under a minute on 2 cores: past this it hangs


def _ip_tool() -> str | None:
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)), None)


IP = _ip_tool()


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], check=check, capture_output=True, text=True, timeout=30)


def unavailable(message: str) -> None:
    """What the tests need is missing: under CI (which installs it, as root) the test fails; elsewhere it is
    skipped, with the reason either way."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _no_namespaces(reason: str) -> None:
    unavailable(f"two-host tests need network namespaces: {reason}. Run as root with iproute2's `ip` "
                "(apt-get install iproute2)")


def require_namespaces() -> None:
    """Fail (CI) or skip unless network namespaces can be made here: root, `ip`, and one trial namespace."""
    if IP is None:
        _no_namespaces("iproute2's `ip` is not installed")
    if os.geteuid() != 0:
        _no_namespaces("not running as root")
    trial = f"{TAG}probe"
    made = run_ip("netns", "add", trial, check=False)
    if made.returncode:
        _no_namespaces(f"`ip netns add` failed: {made.stderr.strip()}")
    run_ip("netns", "del", trial, check=False)


@dataclass
class Host:
    """One machine: a network namespace, its end of the link, its address and its own working folder."""
    namespace: str
    veth: str
    address: str
    folder: Path
    started: list[subprocess.Popen] = field(default_factory=list)

    def pids(self) -> list[int]:
        found = run_ip("netns", "pids", self.namespace, check=False).stdout.split()
        return [int(pid) for pid in found]

    def kill_all(self) -> list[int]:
        """SIGKILL every process in the namespace, as a machine that loses power stops them; their pids."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids


@contextmanager
def two_hosts(root: Path, number: int) -> Iterator[tuple[Host, Host]]:
    """Hosts A (10.231.N.1) and B (10.231.N.2) joined by a veth pair; at the end their processes are killed
    and the namespaces deleted (which deletes the veth pair too), whatever happened in between."""
    hosts = tuple(Host(f"{TAG}n{number}{side}", f"{TAG}v{number}{side}", f"{SUBNET}.{number}.{end}",
                       root / f"host_{side}") for end, side in ((1, "a"), (2, "b")))
    try:
        for host in hosts:
            run_ip("netns", "add", host.namespace)
        a, b = hosts
        run_ip("link", "add", a.veth, "type", "veth", "peer", "name", b.veth)
        for host in hosts:
            run_ip("link", "set", host.veth, "netns", host.namespace)
            run_ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.veth)
            run_ip("-n", host.namespace, "link", "set", host.veth, "up")
            run_ip("-n", host.namespace, "link", "set", "lo", "up")
            host.folder.mkdir(parents=True)
        yield a, b
    finally:
        for host in hosts:
            host.kill_all()
            for process in host.started:
                if process.poll() is None:
                    process.kill()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            run_ip("netns", "del", host.namespace, check=False)
        run_ip("link", "del", hosts[0].veth, check=False)  # still here only if moving it failed


def torchrun_command(host: Host, first: Host, run_id: str, argv: list[str]) -> list[str]:
    """The torchrun command line one host runs (in its working folder, with GLOO_SOCKET_IFNAME naming its
    link): the hostname does not resolve to the link's address, so each host names its own (--local_addr)
    and the first says that it hosts the rendezvous (is_host)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{first.address}:{PORT}", "--rdzv_id", run_id,
            "--rdzv_conf", f"is_host={int(host is first)}", "--local_addr", host.address, "driver.py", *argv]


def start(host: Host, command: list[str], name: str = "torchrun") -> subprocess.Popen:
    """`command` in the host's namespace and working folder, one thread per process; its output goes to
    files in that folder (name.out, name.err)."""
    env = {**one_thread_env(), "GLOO_SOCKET_IFNAME": host.veth}
    print(f"[{host.namespace}] GLOO_SOCKET_IFNAME={host.veth} OMP_NUM_THREADS=1 {shlex.join(command)}")
    with open(host.folder / f"{name}.out", "w") as out, open(host.folder / f"{name}.err", "w") as err:
        process = subprocess.Popen([IP, "netns", "exec", host.namespace, *command], cwd=host.folder, env=env,
                                   stdout=out, stderr=err, start_new_session=True)
    host.started.append(process)
    return process


def stderr_of(host: Host, name: str = "torchrun") -> str:
    return (host.folder / f"{name}.err").read_text(errors="replace")


def why(*hosts: Host) -> str:
    """For a failure message: each host's one-line errors (the project's), then the end of its stderr."""
    parts = []
    for host in hosts:
        text = stderr_of(host)
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        parts.append(f"{host.namespace}:\n" + "\n".join(errors) + "\n..." + text[-1500:])
    return "\n".join(parts)


def start_job(a: Host, b: Host, argv: list[str], patch_b: str = "") -> tuple[subprocess.Popen, subprocess.Popen]:
    """One torchrun per host, the same experiment command line on both; `patch_b` changes host B's driver."""
    run_id = f"{a.namespace}-{time.time_ns()}"
    jobs = []
    for host, patch in ((a, ""), (b, patch_b)):
        write_driver(host.folder, patch)
        jobs.append(start(host, torchrun_command(host, a, run_id, argv)))
    return jobs[0], jobs[1]


def wait_for(process: subprocess.Popen, host: Host, seconds: float = JOB_SECONDS) -> int:
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{host.namespace}'s job did not end within {seconds:.0f} s:\n{stderr_of(host)[-3000:]}")


def copy_data(data: Path, *hosts: Host) -> None:
    """The data at the same path on every machine (README), here each its own copy: data/ in its folder."""
    for host in hosts:
        shutil.copytree(data, host.folder / "data")


def link_down(b: Host) -> list[int]:
    """The machine's network goes: its processes live on, but nothing they send arrives (nor any RST that
    would tell the other side), as with a pulled cable or a switch failure."""
    run_ip("-n", b.namespace, "link", "set", b.veth, "down")
    return []


def power_off(b: Host) -> list[int]:
    """The machine stops: every process in its namespace is SIGKILLed at once (torchrun's agent with its
    worker), so that no agent is left to tell the other host's agent."""
    return b.kill_all()


def gather(a: Host, b: Host) -> str:
    """README's gathering of host B's checkpoints and TensorBoard runs into host A's folders, run on A with rsync
    (B's PROJECT folder is a local path here, as with a network mount). Without rsync it fails under CI, which
    installs it, and elsewhere is skipped with the reason. Returns the command."""
    if not shutil.which("rsync"):
        unavailable("README's gather command needs rsync: apt-get install rsync")
    command = (f"rsync -a {shlex.quote(str(b.folder))}/checkpoints/ checkpoints/ && "
               f"rsync -a {shlex.quote(str(b.folder))}/logs/ logs/")
    subprocess.run(command, shell=True, cwd=a.folder, check=True, timeout=120)
    return command
