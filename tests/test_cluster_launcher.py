"""The cluster launcher end to end: `ray up` / `ray submit` / `ray down` over real SSH on loopback.

Sets up (and removes after): an sshd bound to 127.0.0.1 on a free port with its own config
and host key, a throw-away non-root user with a fresh key, and a local-provider cluster YAML
derived from cluster/local.yaml whose head is 127.0.0.1. The head's Ray runs as that user with
its own temp dir and ports: `ray stop` (which `ray up` and `ray down` run on the head) kills
every Ray process it is allowed to, and a non-root user may kill only its own, so Ray clusters
of other users on this machine are safe. Needs root (useradd, sshd); installs openssh-server,
rsync, netcat and acl with apt-get when missing. When the Python or the clone lies under a
folder others cannot enter (pyenv under /root), the user gets a traverse-only ACL entry on that
folder for the test's duration. Ray has no SSH port option: ssh reaches the port
through `ssh_proxy_command: nc %h PORT`.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import secrets
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import TINY_MODEL, synthetic_cifar, write_parquet_folder
from processes import descendants, end_tree

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PACKAGES = {"sshd": "openssh-server", "rsync": "rsync", "nc": "netcat-openbsd", "setfacl": "acl"}
STUDY_SETS = [*TINY_MODEL, "data.train_subset=null", "data.val_size=100", "train.epochs=1",
              "train.num_workers=1", "train.global_batch_size=50", "tune.max_concurrent_trials=1",
              "tune.search_space={optim.lr: {grid: [0.05, 0.02]}}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def require_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a throw-away user and starts an sshd")
    missing = [pkg for tool, pkg in PACKAGES.items() if not shutil.which(tool, path=SYSTEM_PATH)]
    if not missing:
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"{', '.join(missing)} missing and apt-get unavailable")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update"], env=env, timeout=600)
    result = run(["apt-get", "install", "-y", "--no-install-recommends", *missing], env=env, timeout=600)
    if result.returncode != 0:
        pytest.skip(f"apt-get install {' '.join(missing)} failed: {result.stderr.strip()[-300:]}")


def pids_of_user(user: str) -> list[int]:
    result = run(["ps", "-u", user, "-o", "pid="])
    return [int(p) for p in result.stdout.split()]


def kill_user_processes(user: str) -> None:
    """SIGKILL every process of `user`, and wait until they are gone (userdel refuses a busy user);
    again while new ones appear."""
    for _ in range(50):
        pids = pids_of_user(user)
        if not pids:
            return
        end_tree(pids)


def closed_folders(paths: list[Path]) -> list[Path]:
    """The folders above `paths` (symlinks followed) that other users may not enter."""
    folders = set()
    for path in paths:
        for p in {path, Path(os.path.realpath(path))}:
            folders.update(a for a in p.parents if not a.stat().st_mode & stat.S_IXOTH)
    return sorted(folders)


def remove_ssh_control_dir(cluster_name: str) -> None:
    """Ray's ssh ControlPath folder for this cluster: /tmp/ray_ssh_<user hash>/<cluster hash>."""
    user_hash = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    parent = Path(f"/tmp/ray_ssh_{user_hash}")
    shutil.rmtree(parent / hashlib.sha256(cluster_name.encode()).hexdigest()[:10], ignore_errors=True)
    try:
        parent.rmdir()  # only when no other cluster of this user has one
    except OSError:
        pass


@pytest.fixture
def workdir():
    # Short (Ray's socket paths must fit in 107 bytes) and traversable by the throw-away user.
    path = Path(tempfile.mkdtemp(prefix="rcl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ssh_user(workdir):
    require_tools()
    name = f"rcl{secrets.token_hex(4)}"
    home = workdir / "home"
    # Password '*': none can be typed, yet the account is not locked ('!'), which sshd refuses.
    result = run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/bash", "--password", "*", name])
    if result.returncode != 0:
        pytest.skip(f"useradd failed: {result.stderr.strip()}")
    opened = closed_folders([Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix), REPO])
    # Folders without an ACL of their own get theirs removed after; others lose only our entry.
    had_acl = {f: bool(run(["getfacl", "--skip-base", "--absolute-names", str(f)]).stdout.strip()) for f in opened}
    try:
        for folder in opened:
            run(["setfacl", "-m", f"u:{name}:x", str(folder)], check=True)
        probe = run(["runuser", "-u", name, "--", sys.executable, "-c", "import ray, ray_cifar"],
                    env={**os.environ, "PYTHONPATH": str(REPO)})
        if probe.returncode != 0:
            pytest.skip(f"a non-root user cannot run {sys.executable} with {REPO} (clone and venv must be "
                        f"world-readable): {probe.stderr.strip()[-200:]}")
        key = workdir / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        shutil.copy(f"{key}.pub", ssh_dir / "authorized_keys")
        run(["chown", "-R", f"{name}:{name}", str(ssh_dir)], check=True)
        yield name, key
    finally:
        kill_user_processes(name)
        for folder in opened:
            run(["setfacl", "-x", f"u:{name}", str(folder)] if had_acl[folder] else ["setfacl", "-b", str(folder)])
        deleted = run(["userdel", "--remove", name])
        assert deleted.returncode == 0, deleted.stderr


@pytest.fixture
def sshd(workdir, ssh_user):
    """Our own sshd on 127.0.0.1:<free port>, never the system's config or host keys."""
    name, _ = ssh_user
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "host_key")], check=True)
    port = free_port()
    config = workdir / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {workdir / 'host_key'}\n"
                      f"PidFile {workdir / 'sshd.pid'}\nAllowUsers {name}\nPubkeyAuthentication yes\n"
                      "AuthorizedKeysFile .ssh/authorized_keys\nPasswordAuthentication no\n"
                      "KbdInteractiveAuthentication no\nUsePAM no\nMaxSessions 64\nMaxStartups 64\n"
                      "StrictModes no\n")  # the user's home lies under /tmp, which is world-writable
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege-separation folder
    made_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, parents=True, exist_ok=True)
    daemon = subprocess.Popen([shutil.which("sshd", path=SYSTEM_PATH), "-D", "-e", "-f", str(config)],
                              stdout=subprocess.DEVNULL, stderr=open(workdir / "sshd.log", "w"))
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert daemon.poll() is None, (workdir / "sshd.log").read_text()
            time.sleep(0.1)
        yield port
    finally:
        sessions = descendants(daemon.pid)
        daemon.terminate()
        daemon.wait(timeout=10)
        end_tree(sessions)
        if made_privsep:
            shutil.rmtree(privsep, ignore_errors=True)


def launcher_config(workdir: Path, user: str, key: Path, ssh_port: int) -> dict:
    """cluster/local.yaml pointed at 127.0.0.1: the repo and venv used in place (no copies, no pip)."""
    config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    ray_port, dashboard_port = free_port(), free_port()
    ray_tmp = workdir / "home" / "r"  # the head's Ray files, in the user's home
    # RAY_ADDRESS named, not "auto": other users' Ray clusters on this machine could be found first.
    env = {"PATH": f"{Path(sys.executable).parent}:$PATH", "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp),
           "RAY_ADDRESS": f"127.0.0.1:{ray_port}",
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}", "RAY_USAGE_STATS_ENABLED": "0"}
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    start = (f"ray start --head --node-ip-address=127.0.0.1 --port={ray_port} --num-cpus=2 --temp-dir={ray_tmp} "
             f"--dashboard-port={dashboard_port} --dashboard-agent-listen-port={free_port()} "
             f"--ray-client-server-port={free_port()} --autoscaling-config=~/ray_bootstrap_config.yaml")
    config.update(
        cluster_name=f"rcl-test-{secrets.token_hex(4)}",
        provider={"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        auth={"ssh_user": user, "ssh_private_key": str(key), "ssh_proxy_command": f"nc %h {ssh_port}"},
        file_mounts={},
        setup_commands=[f"echo 'export {exports}' >> ~/.bashrc", f"mkdir -p {ray_tmp}"],
        head_start_ray_commands=["ray stop", start],  # `ray stop` as `user`: it can stop only its own Ray
    )
    return config


def test_ray_up_submit_down_on_loopback(workdir, ssh_user, sshd):
    user, key = ssh_user
    data = write_parquet_folder(str(workdir / "data"), synthetic_cifar(600, 100))
    results = workdir / "results"
    results.mkdir()
    shutil.chown(results, user, user)
    config_file = workdir / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(launcher_config(workdir, user, key, sshd)))
    local_tmp = workdir / "launcher"  # `ray up`'s lock and state files for the local provider
    local_tmp.mkdir()
    # TMPDIR: `ray down`'s config cache (it has no --no-config-cache) stays in our folder too.
    env = {**os.environ, "RAY_TMPDIR": str(local_tmp), "TMPDIR": str(local_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    output = results / "smoke"
    # `ray submit` joins the arguments with spaces into one remote shell command: quote them.
    sets = [a for s in STUDY_SETS for a in ("--set", shlex.quote(s))]
    try:
        up = run([*RAY, "up", "-y", "--no-config-cache", str(config_file)], env=env, timeout=300)
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        submit = run([*RAY, "submit", "--no-config-cache", str(config_file), str(REPO / "cluster" / "study.py"),
                      "--", "--smoke-test", "--data", data, "--output", str(output), *sets], env=env, timeout=900)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    finally:
        down = run([*RAY, "down", "-y", str(config_file)], env=env, timeout=300)
        remove_ssh_control_dir(yaml.safe_load(config_file.read_text())["cluster_name"])
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]

    # The study ran on the head, as the cluster's user, and wrote its Parquet files.
    assert (output / "config.yaml").stat().st_uid == int(run(["id", "-u", user]).stdout)
    trials = pq.read_table(output / "trials.parquet").to_pylist()
    rows = pq.read_table(output / "results.parquet").to_pylist()
    assert sorted(t["optim.lr"] for t in trials) == [0.02, 0.05]
    assert all(t["status"] == "completed" and t["epochs"] == 1 for t in trials)
    assert len(rows) == 2 and {r["trial_id"] for r in rows} == {t["trial_id"] for t in trials}
    assert any(t["test_acc"] is not None for t in trials)

    # `ray down` stopped the head's Ray: nothing of the cluster's user is left running.
    time.sleep(2)
    leftover = run(["ps", "-u", user, "-o", "pid=,args="]).stdout.strip()
    assert not [line for line in leftover.splitlines() if "ray" in line], leftover
