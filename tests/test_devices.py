"""Transports and the harness on this machine: the local device, a real OpenSSH server on loopback,
and the real adb client's failure modes."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PHOTOS, assert_usage_error, probe_files, processes_mentioning, still_running

from devices.bench import Settings, core_mask
from devices.connect import open_device
from devices.device_info import big_cores, cpu_mask, device_info
from devices.transport import ShellResult, Transport
from exporters.inspect_file import inspect_file
from mixnet_deploy.errors import DeviceError, DeviceTimeout, MixdeployError
from quantization import NUM_CALIB
from quantization.calibration import find_images

TRICKY = "it's a \"test\" with $HOME, `backticks`; and spaces"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real OpenSSH server on loopback accepting a fresh key for root; yields the --device value."""
    if not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
        pytest.fail("sshd missing: apt-get install openssh-server (make test installs it)")
    home = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", home / "host"], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", home / "user"], check=True)
    shutil.copy(home / "user.pub", home / "authorized_keys")
    port = free_port()
    (home / "tmp").mkdir()
    # no sftp subsystem (as on Dropbear and OpenWrt boards): files must travel without one; a $TMPDIR (as
    # in Termux, which has no /tmp) that work folders must follow; IPv6 loopback too where this machine has it
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\n" + ("ListenAddress ::1\n" if ipv6_loopback() else "") +
        f"HostKey {home / 'host'}\nAuthorizedKeysFile {home / 'authorized_keys'}\n"
        f"PidFile {home / 'sshd.pid'}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\n"
        f"UsePAM no\nSetEnv TMPDIR={home / 'tmp'}\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    server = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", home / "sshd_config"], stderr=subprocess.DEVNULL)
    for _ in range(50):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    else:
        server.kill()
        pytest.fail(f"sshd did not listen on port {port} within 5 s")
    os.environ["MIXDEPLOY_SSH_OPTIONS"] = (f"-i {home / 'user'} -o UserKnownHostsFile=/dev/null "
                                           "-o StrictHostKeyChecking=no -o LogLevel=ERROR")
    yield f"ssh:root@127.0.0.1:{port}"
    server.terminate()
    server.wait()
    del os.environ["MIXDEPLOY_SSH_OPTIONS"]


@pytest.fixture(params=["local", "ssh", pytest.param("adb", marks=pytest.mark.slow)])  # adb: the ARM64 sim
def device(request):
    """Each transport: this machine, a real sshd on loopback, the virtual ARM64 device over the real adb client."""
    spec = {"local": lambda: "local", "ssh": lambda: request.getfixturevalue("sshd"),
            "adb": lambda: request.getfixturevalue("sim_device")["serial"]}[request.param]()
    with open_device(spec) as transport:
        yield transport


def test_transport_shell_push_pull_and_cleanup(device, tmp_path, monkeypatch):
    result = device.shell(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (result.code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert device.shell(["printf", "%s", TRICKY]).stdout == TRICKY
    with pytest.raises(DeviceError, match="exit code 3"):
        device.shell(["sh", "-c", "exit 3"])
    blob = np.random.default_rng().integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (tmp_path / "-blob").write_bytes(blob)
    remote = f"{device.workdir}/{TRICKY}"
    monkeypatch.chdir(tmp_path)
    device.push("-blob", remote)  # a relative name that starts like an option
    device.pull(remote, "-back")
    assert (tmp_path / "-back").read_bytes() == blob
    work = device.workdir
    device.cleanup()
    assert device.shell(["test", "-e", work], check=False).code == 1


def test_device_commands_leave_the_callers_input_alone(device):
    """Device commands get empty input: adb and ssh forward theirs to the device, so in a script's
    `while read` loop a bench took the loop's remaining lines."""
    script = (f"import sys; from devices.connect import open_device; d = open_device({device.name!r})\n"
              "print(repr(d.shell(['cat']).stdout), repr(sys.stdin.read()))")
    lines = "line 1\nline 2\n"
    done = subprocess.run([sys.executable, "-c", script], input=lines, capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=60)
    assert done.stdout == f"'' {lines!r}\n", done.stderr


def test_a_command_cut_off_is_stopped_on_the_device(device):
    """A command cut off by --timeout or a stop ran on over ssh (sshd sends no hangup to a command
    without a terminal; adbd signals only its shell): cleanup() kills its whole process group there."""
    seconds = f"{time.time() % 100 + 100:.3f}"  # a sleep of this test's own, found by its command line
    assert device.workdir  # created before the command, which records its process group there
    with pytest.raises(DeviceTimeout) as err:
        device.shell(["sh", "-c", f"sleep {seconds}; echo done"], timeout=2)
    # named by what ran on the device, not by the adb or ssh command line around it
    assert str(err.value) == f"{device.name}: `sh -c 'sleep {seconds}; echo done'` timed out after 2 s"
    device.cleanup()
    assert not still_running(f"sleep {seconds}")


def test_ssh_reaches_a_board_by_its_ssh_config_entry_or_ipv6_address(sshd, tmp_path, monkeypatch):
    """Without a port, ssh takes the one ~/.ssh/config gives (mixdeploy passed -p 22 over it);
    an IPv6 address in brackets reaches ssh without them."""
    port = sshd.rsplit(":", 1)[1]
    (tmp_path / "config").write_text(f"Host board\n  HostName 127.0.0.1\n  Port {port}\n")
    monkeypatch.setenv("MIXDEPLOY_SSH_OPTIONS", os.environ["MIXDEPLOY_SSH_OPTIONS"] + f" -F {tmp_path / 'config'}")
    with open_device("ssh:root@board") as board:
        assert board.shell(["echo", "hi"]).stdout == "hi\n"
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    with open_device(f"ssh:root@[::1]:{port}") as board:
        assert board.shell(["echo", "hi"]).stdout == "hi\n"


def test_work_folders_follow_the_boards_tmpdir(sshd):
    """Termux (Python on a phone, over ssh) has no /tmp: its $TMPDIR is where work folders go."""
    with open_device(sshd) as board:
        tmpdir = board.shell(["sh", "-c", 'echo "$TMPDIR"']).stdout.strip()
        assert tmpdir != "/tmp" and board.tmp_root == tmpdir
        assert board.workdir.startswith(tmpdir + "/mixdeploy.")


def test_a_board_whose_login_files_print_still_copies_files(sshd, tmp_path):
    """A banner printed by the login shell's files (bash reads .bashrc over ssh) lands before every
    command's output: the work folder and pulled files are read past it."""
    from devices.ssh import SshTransport

    class Chatty(SshTransport):  # the banner printed before each command, as such a login shell does
        def _ssh(self, command: str, timeout: float, stdin: str | None = None, stdout: str | None = None) -> ShellResult:
            return super()._ssh("echo 'Welcome to the board!'; " + command, timeout, stdin, stdout)

    blob = np.random.default_rng().integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    (tmp_path / "blob").write_bytes(blob)
    with Chatty(sshd.removeprefix("ssh:")) as board:
        assert board.shell(["true"]).stdout == "Welcome to the board!\n"
        assert board.shell(["test", "-d", board.workdir]).code == 0
        board.push(tmp_path / "blob", f"{board.workdir}/blob")
        board.pull(f"{board.workdir}/blob", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == blob


def test_one_run_at_a_time_per_device(tmp_path):
    """A second mixdeploy run on a device waits for the first (both would time each other's load),
    saying whose run it waits for; the lock goes with the first run's end."""
    import devices.transport

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, devices.transport as t; from pathlib import Path; "
         f"t.LOCKS = Path({str(devices.transport.LOCKS)!r}); d = t.Transport(); d.name = 'local'; d.reserve(); "
         "print('held', flush=True); sys.stdin.read(); d.cleanup()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline() == "held\n"
        said, reserved = [], threading.Event()
        device = open_device("local")
        waiter = threading.Thread(target=lambda: (device.reserve(said.append), reserved.set()), daemon=True)
        waiter.start()
        time.sleep(1.5)
        assert not reserved.is_set()
        assert said == [f"waiting for another mixdeploy run on local (pid {holder.pid}) to finish"]
        holder.stdin.close()  # the first run ends
        assert reserved.wait(15)
        device.reserve()  # held already: no second wait on our own lock
        device.cleanup()
        with open_device("local") as again:  # released
            again.reserve(said.append)
        assert len(said) == 1
    finally:
        holder.kill()
        holder.wait()


def test_a_runner_that_prints_no_result_is_one_line(run_cli, digits_exports, tmp_path):
    """Output that is not the runner's JSON (an old adb merges stderr and exits 0; a --python wrapper
    that prints after the runner) is one line naming the file and what was printed."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\n{shlex.quote(sys.executable)} \"$@\"\necho 'python3: not found'\n")
    wrapper.chmod(0o755)
    result = run_cli("bench", digits_exports["fp32.tflite"], "--device", "local", "--python", wrapper, "--runs", "2")
    assert result.code == 1 and len(result.message) == 1, result.err
    assert result.message[0].endswith("the runner failed on local for fp32.tflite (exit 0): python3: not found")


def _sshd_sessions_above(command: str) -> list[int]:
    """The sshd session processes (not the listener) above the process running `command` (its whole
    command line: not the ssh client that names it), or [] while none runs it."""
    def cmdline(pid: int | str) -> bytes:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        return b""

    pid = next((int(proc.name) for proc in Path("/proc").glob("[0-9]*")
                if cmdline(proc.name) == command.replace(" ", "\0").encode() + b"\0"), 1)
    sessions = []
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent
        if cmdline(pid).startswith(b"sshd: ") and b"[listener]" not in cmdline(pid):  # "sshd: root@notty"
            sessions.append(pid)
    return sessions


@pytest.mark.slow
def test_a_board_gone_silent_mid_command_is_lost_in_seconds(sshd):
    """A board that freezes or drops off the network answers nothing, not even a closed connection:
    ssh gives up after some 15 s of silence (one line), long before --timeout."""
    device = open_device(sshd)
    seconds = f"{time.time() % 100 + 300:.3f}"  # this test's own sleep, found by its command line
    frozen: list[int] = []

    def freeze() -> None:  # this connection's sshd processes, once the command runs there
        deadline = time.monotonic() + 60
        while not frozen and time.monotonic() < deadline:
            time.sleep(0.1)
            frozen.extend(_sshd_sessions_above(f"sleep {seconds}"))
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)

    thread = threading.Thread(target=freeze)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(DeviceError) as err:
            device.shell(["sleep", seconds], timeout=150)
    finally:
        thread.join()
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
        subprocess.run(["pkill", "-f", f"sleep {seconds}"], check=False)
    assert frozen and 10 < time.monotonic() - started < 60 and not isinstance(err.value, DeviceTimeout)
    assert str(err.value).startswith("ssh to root@127.0.0.1 failed: ") and "\n" not in str(err.value), err.value


def test_cleanup_leaves_a_group_alone_when_the_cut_command_never_started(monkeypatch):
    """The connection fails before a command starts: .pgid still names an earlier command's process
    group, whose id may be another process's by now. cleanup() kills only the cut command's group."""
    bystander = subprocess.Popen(["setsid", "sleep", "60"])  # a group of its own, standing for a reused id
    try:
        with open_device("local") as device:
            pgid = f"{device.workdir}/.pgid"
            number = device._commands + 1  # of the command below: it records its group, then ours replaces it
            device.shell(["sh", "-c", f"echo {bystander.pid} {number} > {pgid}"])
            with monkeypatch.context() as patch, pytest.raises(DeviceError):
                patch.setattr(device, "_shell", lambda *_: (_ for _ in ()).throw(DeviceError("connection refused")))
                device.shell(["true"])
        assert bystander.poll() is None  # cleanup() ran on leaving the block
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("leader", ["alive", "hung up"])
def test_a_command_left_running_by_a_lost_device_is_stopped_on_the_next_connection(sshd, monkeypatch, tmp_path, leader):
    """The connection drops while a command runs (ssh leaves it running there) and the clean-up
    cannot reach the device: the next connection kills what still runs in the folder, then removes it,
    also when the group's leader is gone (a hang-up ends the shell; what it started runs on)."""
    import devices.transport

    monkeypatch.setattr(devices.transport, "STALE", tmp_path / "stale.json")
    seconds = f"{time.time() % 100 + 200:.3f}"
    device = open_device(sshd)
    work = device.workdir
    with pytest.raises(DeviceTimeout):  # named after its folder, as a runner is by its script's path
        device.shell(["sh", "-c", f"sleep {seconds}; echo done", work], timeout=2)
    if leader == "hung up":  # the device is this machine: its shell, the group's leader, killed by a hang-up
        os.kill(int(Path(work, ".pgid").read_text().split()[0]), signal.SIGHUP)
        time.sleep(0.5)
        assert processes_mentioning(f"sh -c sleep {seconds}; echo done {work}")  # its child runs on

    def lost(*_):
        raise DeviceError("lost")

    with monkeypatch.context() as patch:
        patch.setattr(device, "_shell", lost)
        device.cleanup()  # the folder is remembered for the next connection
    assert processes_mentioning(f"sleep {seconds}") and work in (tmp_path / "stale.json").read_text()
    with open_device(sshd) as again:
        assert again.workdir != work
        assert not still_running(f"sleep {seconds}")
        assert again.shell(["test", "-e", work], check=False).code == 1


def test_device_info(device):
    info = device_info(device)
    emulated = device.name.startswith("adb:")  # this machine's cores, seen through QEMU as an arm64 device
    assert info["abi"] == ("arm64-v8a" if emulated else "x86_64") and info["os"].startswith("Linux")
    assert len(info["cores"]) == os.cpu_count() and info["big_cores"]
    assert info["mem_free_mb"] > 100 and info["emulated"] is emulated


PHONE = [{"cpu": i, "max_khz": f} for i, f in enumerate([1800000] * 4 + [2400000] * 3 + [3000000])]  # three tiers


def test_big_cores_and_masks():
    assert big_cores(PHONE) == [7] and cpu_mask([4, 5, 6, 7]) == "f0"
    assert big_cores(PHONE, 2) == big_cores(PHONE, 4) == [4, 5, 6, 7] and big_cores(PHONE, 5) == list(range(8))
    assert big_cores([{"cpu": 0, "max_khz": None}, {"cpu": 1, "max_khz": None}]) == [0, 1]


def test_pinning_gives_every_thread_a_core():
    """A phone's default pinning takes the next tier down for more threads than its fastest cores;
    a --cpus mask of fewer cores than threads is refused (they would time each other)."""
    phone = {"os": "Android 14", "emulated": False, "cores": PHONE}
    assert core_mask(None, phone, 1) == "80" and core_mask(None, phone, 2) == core_mask("big", phone, 4) == "f0"
    assert core_mask(None, {**phone, "emulated": True}, 2) is None and core_mask("c0", phone, 2) == "c0"
    with pytest.raises(MixdeployError, match="--cpus 80 has 1 core"):
        core_mask("80", phone, 2)
    with pytest.raises(MixdeployError, match="--cpus 4-7: give a hex core mask"):
        Settings([1], cpus="4-7")


class Props(Transport):
    """A device whose shell prints the facts device_info asks for."""

    name = "props"
    python = "python3"

    def __init__(self, printed: str) -> None:
        super().__init__()
        self.printed = printed

    def _shell(self, command: str, timeout: float) -> ShellResult:
        if "mktemp" in command:
            return ShellResult(0, "/data/local/tmp/mixdeploy.props\n", "")
        return ShellResult(0, self.printed if "uname" in command else "", "")


@pytest.mark.parametrize(("props", "emulated"), [("qemu 1", True), ("bootqemu 1", True), ("qemu 0", False), ("", False)])
def test_emulator_is_told_by_its_properties(props, emulated):
    """ro.kernel.qemu or (newer images) ro.boot.qemu set to 1: an emulator; "0" is a phone."""
    info = device_info(Props(f"uname Linux 6.1 aarch64\nandroid 14\n{props}\ncpu 0 2000000\n"))
    assert info["emulated"] is emulated and info["os"] == "Android 14"


@pytest.mark.parametrize(("facts", "cooldown", "rest"), [("android 14\nqemu 0", None, 10.0), ("android 14\nqemu 1", None, 0.0),
                                                      ("android", None, 0.0), ("android 14\nqemu 0", 2.5, 2.5)])
def test_a_real_phone_rests_between_models(facts, cooldown, rest, tmp_path):
    """A phone throttles within seconds of full load: 10 s between models by default; none on an
    emulator or a Linux board; --cooldown wins."""
    from devices.bench import Session

    device = Props(f"uname Linux 6.1 aarch64\n{facts}\ncpu 0 2000000\n")
    assert Session(device, Settings([1], runner="benchmark_model", cooldown=cooldown), tmp_path).cooldown() == rest


@pytest.mark.slow
def test_bench_over_ssh(sshd, digits_exports, run_cli, tmp_path):
    """The python runner over a real ssh connection, with the venv's Python as the device's."""
    import sys

    files = [digits_exports["fp32.tflite"], digits_exports["int8.tflite"]]
    result = run_cli("bench", *files, "--device", sshd, "--python", sys.executable, "--runs", "5",
                     "--parity", digits_exports["eval"], "--parity-samples", "16", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["device"]["name"] == sshd
    assert [r["parity"]["passed"] for r in report["results"]] == [True, True]
    assert report["results"][0]["parity"]["top1_agreement"] == 1.0 and report["results"][0]["parity"]["samples"] == 16
    # the system python3 lacks ai_edge_litert: said in one line
    missing = run_cli("bench", files[0], "--device", sshd, "--python", "/bin/false", "--runs", "1",
                      "--parity-samples", "1", "--parity", digits_exports["eval"])  # one image is enough
    assert missing.code == 1 and "cannot import numpy and ai_edge_litert" in missing.err
    assert len(missing.message) == 1


def test_unreachable_devices(run_cli, tmp_path, digits_exports, monkeypatch):
    model = digits_exports["fp32.tflite"]
    closed = run_cli("bench", model, "--device", f"ssh:root@127.0.0.1:{free_port()}")
    assert closed.code == 1 and "ssh to root@127.0.0.1 failed" in closed.err and "refused" in closed.err
    assert len(closed.message) == 1
    assert_usage_error(run_cli("bench", model, "--device", "ssh:bad host"), "ssh:USER@HOST")
    assert_usage_error(run_cli("bench", model, "--device", "ssh:-Fevil"), "cannot start with '-'")  # not an ssh option
    absent = run_cli("bench", model, "--device", "no-such-serial")
    assert absent.code == 1 and "adb device no-such-serial not found" in absent.err
    assert "(--device no-such-serial was taken as an adb serial; the other forms: local, ssh:" in absent.err  # a typo
    # a network serial nothing listens on: adb's own reason, and no offline entry left in `adb devices`
    port = free_port()
    refused = run_cli("bench", model, "--device", f"127.0.0.1:{port}")
    assert refused.code == 1 and f"could not connect to adb device 127.0.0.1:{port}" in refused.err
    assert "refused" in refused.err and len(refused.message) == 1
    # a connect that times out leaves the serial listed offline: the next one starts afresh
    subprocess.run(["adb", "connect", "10.255.255.1:5555"], capture_output=True, timeout=120, check=False)
    unreachable = run_cli("device", "info", "10.255.255.1:5555")
    assert unreachable.code == 1 and "could not connect to adb device 10.255.255.1:5555" in unreachable.err
    assert "10.255.255.1" not in subprocess.run(["adb", "devices"], capture_output=True, text=True).stdout
    monkeypatch.setenv("PATH", str(tmp_path))
    no_adb = run_cli("bench", model, "--device", "emulator-5554")
    assert no_adb.code == 1 and "adb not found" in no_adb.err and "apt-get install adb" in no_adb.err
    assert "was taken as an adb serial; the other forms: local, ssh:" in no_adb.err and len(no_adb.message) == 1
    no_adb = run_cli("bench", model, "--device", "adb:emulator-5554")  # asked for adb: only how to get it
    assert no_adb.code == 1 and "adb not found" in no_adb.err and "taken as" not in no_adb.err


def test_bad_bench_options(run_cli, digits_exports):
    model = digits_exports["fp32.tflite"]
    assert_usage_error(run_cli("bench", model, "--cpus", "zz", "--parity", digits_exports["eval"]), "--cpus zz")
    assert_usage_error(run_cli("bench", model, "--cpus", "ff0", "--parity", digits_exports["eval"]), "lacks", "cores 0-")
    assert_usage_error(run_cli("bench", model, "--cpus", "0", "--parity", digits_exports["eval"]), "selects no core")
    assert_usage_error(run_cli("bench", model, "--cpus", "-1", "--parity", digits_exports["eval"]), "give a hex core mask")
    assert_usage_error(run_cli("bench", model, "--cpus", "1", "--threads", "1,2", "--parity", digits_exports["eval"]),
                       "--cpus 1 has 1 core(s) for 2 threads")
    assert_usage_error(run_cli("bench", model, f"{Path(model).parent}/./{Path(model).name}", "--parity", digits_exports["eval"]), "given twice")
    assert_usage_error(run_cli("bench", model, "--threads", "1,2,1"), "names a thread count twice")
    assert_usage_error(run_cli("bench", model, "--parity", "/nonexistent/photos"), "does not exist")
    for option, value, fragment in (("--timeout", "nan", "not a finite number"), ("--timeout", "1e9", "1<=x<=86400"),
                                    ("--cooldown", "inf", "0<=x<=3600"), ("--cooldown", "nan", "not a finite number")):
        assert_usage_error(run_cli("bench", model, option, value), option, fragment)
    assert_usage_error(run_cli("bench", model, "--python", ""), "--python", "is empty")  # "$UNSET" was python3
    assert_usage_error(run_cli("export", "mixnet_s", "--tune", "local", "--python", " "), "--python", "is empty")


def test_benchmark_model_runner_needs_a_binary(run_cli, digits_exports, tmp_path, monkeypatch):
    """Refused before the PyTorch reference is computed (minutes for a large model)."""
    import devices.bench

    monkeypatch.setenv("MIXDEPLOY_BENCHMARK_MODEL_DIR", str(tmp_path))
    monkeypatch.setattr(devices.bench, "reference_outputs", lambda *_: pytest.fail("the reference came first"))
    args = ["--runner", "benchmark_model", "--parity", digits_exports["eval"], "--parity-samples", "2"]
    assert_usage_error(run_cli("bench", digits_exports["fp32.tflite"], *args), "no benchmark_model for linux-x86_64",
                       str(tmp_path / "linux-x86_64" / "benchmark_model"))
    assert_usage_error(run_cli("bench", digits_exports["fp32.onnx"], *args, "--benchmark-binary", "/bin/ls"),
                       "runs .tflite files")
    assert_usage_error(run_cli("bench", digits_exports["fp32.tflite"], *args, "--benchmark-binary", __file__),
                       "not an executable ELF file")


@pytest.mark.slow
def test_compare_peers(run_cli, digits, tmp_path, monkeypatch):
    """Ours against the peers this machine has (always the plain export or ORT's quantizer; onnx2tf
    and litert-torch when benchmarks/peers/setup.sh made their environments)."""
    import tempfile

    from exporters import peers

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the comparison's work folders go here
    root, checkpoint = digits
    common = ["bench", "--compare-peers", "mixnet_s", "--checkpoint", checkpoint, "--parity", root / "eval",
              "--runs", "5"]
    result = run_cli(*common, "--parity-samples", "8", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["model"]["input_size"] == [3, 32, 32]  # the digits checkpoint's own (its logits blow up at other sizes)
    rows = {r["source"]: r for r in report["results"]}
    ours = [r for r in report["results"] if r["source"] == "mixdeploy"]
    assert sorted(r["format"] for r in ours) == ["onnx", "tflite"] and all(r["ratio_to_ours"] == 1 for r in ours)
    plain = rows["plain torch.onnx.export"]
    assert plain["format"] == "onnx" and plain["parity"]["samples"] == 8 and plain["ratio_to_ours"] > 0
    assert all(r["parity"]["passed"] and r["precision"] == "fp32" for r in report["results"])
    assert report["kept_in"] is None and not any(Path(r["file"]).is_absolute() for r in report["results"])
    assert not list((tmp_path / "tmp").glob("mixdeploy-*"))  # the files compared are removed with their folder
    for peer in ("onnx2tf", "litert_torch"):
        assert (peer in rows) == peers.available()[peer]
        if not peers.available()[peer]:
            assert any(label.startswith(peer) for label in report["missing_peers"])
    # int8: ours quantized, ORT's quantizer with its defaults as the ONNX peer; a peer failing parity is a finding
    table = run_cli(*common, "--parity-samples", "4", "--precision", "int8", "--keep", tmp_path / "kept")
    assert table.code == 0, table.err
    assert "vs ours" in table.out and "ORT quantize_static (defaults)" in table.out and "int8" in table.out
    assert f"files kept in {tmp_path / 'kept'}" in table.out and (tmp_path / "kept" / "ours" / "mixnet_s_int8.onnx").exists()
    # ours are calibrated on the peers' photos, all of them (not quantize's four fifths), a sample of a large folder
    assert len(find_images(root / "eval")) > NUM_CALIB
    for fmt in ("onnx", "tflite"):
        meta = inspect_file(tmp_path / "kept" / "ours" / f"mixnet_s_int8.{fmt}")["metadata"]
        assert meta["mixdeploy.quantization"]["calibration_images"] == NUM_CALIB
    assert_usage_error(run_cli(*common, "--keep", tmp_path / "kept"), "--keep", "is not empty")


@pytest.mark.slow
def test_compare_peers_keep_folder(run_cli, digits, tmp_path, monkeypatch):
    """--keep DIR must be a new or empty folder mixdeploy can write in; a comparison that fails
    after writing files there leaves it empty again, so the same command can run again."""
    import devices.compare_peers
    from exporters import peers

    root, checkpoint = digits
    monkeypatch.setattr(peers, "available", lambda: {"onnx2tf": False, "litert_torch": False})

    def device_gone(*_, **__):
        raise DeviceError("gone")

    monkeypatch.setattr(devices.compare_peers, "bench", device_gone)  # after every file was written
    args = ["bench", "--compare-peers", "mixnet_s", "--checkpoint", checkpoint, "--parity", root / "eval", "--keep"]
    failed = run_cli(*args, tmp_path / "kept")
    assert failed.code == 1 and failed.message == ["mixdeploy: error: gone"]
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())
    (tmp_path / "kept" / "old.onnx").write_bytes(b"x")
    assert_usage_error(run_cli(*args, tmp_path / "kept"), "is not empty")
    assert_usage_error(run_cli(*args, tmp_path / "kept" / "old.onnx"), "is not a folder")
    assert_usage_error(run_cli(*args, "/proc/mixdeploy-kept"), "cannot write in it")
    # a device Python without the runtimes fails before the exports (minutes for a large model)
    monkeypatch.setattr(devices.compare_peers, "load_model", lambda *_: pytest.fail("the model was built"))
    (tmp_path / "kept" / "old.onnx").unlink()
    missing = run_cli(*args, tmp_path / "kept", "--python", "/bin/false")
    assert missing.code == 1 and len(missing.message) == 1 and "cannot import numpy" in missing.err
    assert not list((tmp_path / "kept").iterdir())


def test_device_info_command(run_cli, tmp_path):
    """`device info` of this machine, in any letter case; an empty device is a usage error, not an adb serial."""
    shown = run_cli("device", "info", "Local", "--json")
    assert shown.code == 0, shown.err
    info = json.loads(shown.out)
    assert info["name"] == "local" and len(info["cores"]) == os.cpu_count() and not info["emulated"]
    table = run_cli("device", "info")  # local by default
    assert table.code == 0 and table.out.startswith("local  ") and "cores: cpu0" in table.out
    assert_usage_error(run_cli("device", "info", ""), "the device is empty")
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert_usage_error(run_cli("bench", tmp_path / "m.onnx", "--device", " "), "the device is empty")


def test_bench_needs_files_or_peers(run_cli, tmp_path):
    assert_usage_error(run_cli("bench"), "give exported FILES")
    shutil.copy(next(PHOTOS.glob("*.jpg")), tmp_path)  # enough to check one file's parity, not to calibrate peers
    assert_usage_error(run_cli("bench", "--compare-peers", "mixnet_s", "--parity", tmp_path, "--parity-samples", "1"),
                       "holds 1 JPEG", "need at least 2")
    assert_usage_error(run_cli("bench", "x.onnx", "--compare-peers", "mixnet_s"), "not both")
    assert_usage_error(run_cli("bench", "x.onnx", "--input-size", "160"), "goes with --compare-peers")
    assert_usage_error(run_cli("bench", "x.onnx", "--checkpoint", "w.pth", "--precision", "int8"),
                       "--precision, --checkpoint go with --compare-peers")
    assert_usage_error(run_cli("bench", "x.onnx", "--benchmark-binary", "bm"), "goes with --runner benchmark_model")
    assert_usage_error(run_cli("bench", "x.onnx", "--keep", "k"), "--keep goes with --compare-peers")
    assert_usage_error(run_cli("bench", "--compare-peers", "mixnet_s", "--runner", "benchmark_model"),
                       "benches ONNX files too")


def test_a_failing_peer_is_one_line_of_the_table():
    from exporters.peers import run_checked

    def fails() -> Path:
        raise ValueError("calibration failed:\n  node Conv_3\n\n  has no range")

    def fails_in_a_subprocess() -> Path:
        subprocess.run([sys.executable, "-c", "import sys; sys.exit('line 1\\nline 2')"], check=True, capture_output=True)

    assert run_checked(fails) == (None, "calibration failed: | node Conv_3 | has no range")
    assert run_checked(fails_in_a_subprocess) == (None, "line 1 | line 2")


def test_bench_checks_the_report_path_before_measuring(run_cli, tmp_path):
    """A bad --report fails at once, in one line, before any file is read (x.onnx does not exist)."""
    assert_usage_error(run_cli("bench", "x.onnx", "--report", tmp_path / "r.png"), "must end in .md")
    assert_usage_error(run_cli("bench", "x.onnx", "--report", tmp_path / "nope" / "r.md"), "does not exist")
    (tmp_path / "r.md").write_text("old")
    assert_usage_error(run_cli("bench", "x.onnx", "--report", tmp_path / "r.md"), "exists", "--force")
    assert os.listdir(tmp_path) == ["r.md"]


@pytest.mark.slow
def test_tune_on_this_machine(run_cli, digits, tmp_path, tune_cache, monkeypatch):
    """export --tune local: every layer shape measured, close calls tried in the whole model, the
    verdict cached; the second export measures nothing and gives the same plan."""
    from devices.tune import TimingCache

    _, checkpoint = digits
    args = ["export", "mixnet_s", "--checkpoint", checkpoint, "--format", "tflite", "--tune", "local", "--json",
            "--force", "-o", tmp_path / "tuned.tflite", "--tune-runs", "5"]  # the mechanism, not the figures
    first = run_cli(*args)
    assert first.code == 0, first.err
    report = json.loads(first.out)[0]
    tuning = report["tuning"]
    assert tuning["measured_shapes"] > 10 and tuning["cached_shapes"] == 0 and tuning["timing"]["runs"] == 5
    assert sum(tuning["probes"].values()) == probe_files(checkpoint)  # reused if the ARM device's tuning ran first
    # (whether a close call is swapped depends on this run's timings: the scripted test below asserts the swaps)
    assert set(tuning["whole_model_ms"]) - {"per-layer"} == {"tuned", "auto", "split", "fold"}
    assert not tuning["refined"] or "per-layer" in tuning["whole_model_ms"]  # kept swaps timed without them too
    assert report["plan"]["source"].endswith("on local") and report["parity"]["passed"]
    chosen = min(tuning["whole_model_ms"], key=tuning["whole_model_ms"].get)
    assert report["plan"]["source"].startswith("tuned" if chosen in ("tuned", "per-layer") else chosen)
    for swap in tuning["swaps"]:
        layer = next(r for r in tuning["layers"] if r["layer"] == swap["layer"])
        assert swap["choice"] in layer["times_ms"] and swap["choice"] != layer["choice"]
    second = run_cli(*args)
    again = json.loads(second.out)[0]
    assert again["tuning"]["measured_shapes"] == 0 and again["plan"]["layers"] == report["plan"]["layers"]
    cache = TimingCache(tuning["fingerprint"]).path  # a cache written before a lowering existed lacks it
    data = json.loads(cache.read_text())
    stale = next(key for key, times in data["shapes"].items() if "split+strips" in times)
    del data["shapes"][stale]["split+strips"]
    cache.write_text(json.dumps(data))
    third = json.loads(run_cli(*args).out)[0]["tuning"]
    assert third["measured_shapes"] == 1 and "split+strips" in json.loads(cache.read_text())["shapes"][stale]
    assert third["probes"]["converted"] == 0 and third["probes"]["reused"] > 1  # the shape's probe files were kept
    # new cost tables make another auto plan: the cached verdict on the old one is not reused
    import devices.tune
    import exporters.export
    from mixnet_deploy.lower import analyse, preset_plan

    decided = len(json.loads(cache.read_text())["decisions"])
    monkeypatch.setattr(devices.tune, "make_plan", lambda _, model, size, target: preset_plan(
        analyse(model, size), "split", target))
    fourth = json.loads(run_cli(*args).out)[0]["tuning"]
    assert fourth["measured_shapes"] == 0 and len(json.loads(cache.read_text())["decisions"]) == decided + 1
    assert_usage_error(run_cli("export", "mixnet_s", "--tune", "local", "--plan", "fold"), "leave out --plan")
    # the model and the output are checked before the device is reached (an unroutable host: 30 s)
    unroutable = ("--tune", "ssh:u@10.255.255.1", "--format", "tflite")
    assert_usage_error(run_cli("export", "mixnet_ss", *unroutable), "unknown model 'mixnet_ss'")
    assert_usage_error(run_cli("export", "mixnet_s", *unroutable, "-o", tmp_path / "tuned.tflite"), "exists")
    assert_usage_error(run_cli("export", "mixnet_s", "--precision", "int8"), "goes with --tune")
    assert_usage_error(run_cli("export", "mixnet_s", "--tune-runs", "3"), "--tune-runs goes with --tune")
    assert_usage_error(run_cli("export", "mixnet_s", "--python", "python3"), "--python goes with --tune")
    assert_usage_error(run_cli("export", "mixnet_s", "--tune", "local", "--cpus", "4-7"), "give a hex core mask")
    # the device's runtime is checked before the model is built (minutes for a large one)
    monkeypatch.setattr(exporters.export, "load_model", lambda *_: pytest.fail("the model was built"))
    missing = run_cli("export", "mixnet_s", "--tune", "local", "--python", "/nonexistent/python3", "--force",
                      "--format", "tflite", "-o", tmp_path / "tuned.tflite")
    assert missing.code == 1 and missing.message == [("mixdeploy: error: local has no /nonexistent/python3: pass "
                                                      "--python PATH of its Python (bench can also use --runner "
                                                      "benchmark_model)")]


def test_swaps_slower_together_are_dropped(tmp_path, monkeypatch):
    """Each close call's runner-up made the whole model faster alone, but together they are slower
    than the per-layer plan without them: the per-layer plan is exported, its swaps dropped. The
    device's timings are scripted (the decision is what is tested; the real timing is tested above)."""
    import timm

    import devices.tune
    from devices.tune import TimingCache
    from mixnet_deploy.lower import analyse

    class ScriptedTuner:
        def __init__(self, device, fmt, precision, settings, rounds, host):
            self.fmt, self.precision, self.fingerprint = fmt, precision, {"scripted": True}

        def time(self, files):
            if "tuned" not in files:  # a layer's probes: the candidates in order, each 1 % slower
                return {choice: 1 + 0.01 * i for i, choice in enumerate(files)}
            if "swap0" in files:
                return {label: 10.0 if label == "tuned" else 9.0 for label in files}
            assert set(files) == {"tuned", "per-layer", "auto", "split", "fold"}  # the plan without the swaps too
            return {"tuned": 9.5, "per-layer": 9.0, "auto": 9.2, "split": 20.0, "fold": 15.0}

    monkeypatch.setenv("MIXDEPLOY_TUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(devices.tune, "Tuner", ScriptedTuner)
    monkeypatch.setattr(devices.tune, "_probe_file", lambda info, choice, *_: Path(choice))
    monkeypatch.setattr(devices.tune, "write_model", lambda module, size, path, *_: path.touch())
    model = timm.create_model("mixnet_s").eval()
    layers = analyse(model, (3, 64, 64))
    result = devices.tune.tune(model, (3, 64, 64), open_device("local"), "onnx")
    assert len(result.swaps) == devices.tune.REFINE and result.refined == {}
    assert result.plan.source == "tuned on local" and result.whole_model_ms["per-layer"] == 9.0
    assert result.plan.layers == {info.name: info.candidates[0] for info in layers}
    decision = next(iter(TimingCache(result.fingerprint).decisions.values()))
    assert decision["best"] == "per-layer" and len(decision["refined"]) == devices.tune.REFINE
    original = type(model).forward_head

    def edited(self, x, pre_logits=False):  # the same modules, another method of forward(): the verdict is made again
        return original(self, x, pre_logits) * 1.0

    monkeypatch.setattr(type(model), "forward_head", edited)
    devices.tune.tune(model, (3, 64, 64), open_device("local"), "onnx")
    assert len(TimingCache(result.fingerprint).decisions) == 2


def test_a_timing_cache_of_another_form_is_measured_again(tmp_path, monkeypatch):
    """A cache file that is not the JSON tuning writes (hand-edited, another version) counts as empty."""
    from devices.tune import TimingCache

    monkeypatch.setenv("MIXDEPLOY_TUNE_CACHE", str(tmp_path))
    fingerprint = {"device": "local", "format": "onnx"}
    for text in ("[1, 2]", '{"shapes": [1]}', '{"shapes": {"k": 3}}', '{"shapes": {}, "decisions": 5}', "not json",
                 '{"shapes": {"k": {"split": "1.5"}}}', '{"shapes": {"k": {"split": true}}}'):
        TimingCache(fingerprint).path.write_text(text)
        cache = TimingCache(fingerprint)
        assert (cache.shapes, cache.decisions) == ({}, {}), text
    TimingCache(fingerprint).path.write_text('{"shapes": {"k": {"split": 1.5}}, "decisions": {"m": {}}}')
    assert TimingCache(fingerprint).shapes == {"k": {"split": 1.5}}


def test_a_damaged_probe_file_is_converted_again(tmp_path, monkeypatch):
    """A probe model in the cache that no longer matches its recorded SHA-256 (truncated by a full
    disk, a crash before the data reached it) is converted again, not sent to the device."""
    import onnx
    import timm

    from devices.tune import _probe_file
    from mixnet_deploy.lower import analyse

    monkeypatch.setenv("MIXDEPLOY_TUNE_CACHE", str(tmp_path))
    info = analyse(timm.create_model("mixnet_s").eval(), (3, 64, 64))[0]
    counts = {"converted": 0, "reused": 0}
    path = _probe_file(info, info.candidates[0], "onnx", "fp32", counts)
    assert _probe_file(info, info.candidates[0], "onnx", "fp32", counts) == path
    assert counts == {"converted": 1, "reused": 1}
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    assert _probe_file(info, info.candidates[0], "onnx", "fp32", counts) == path
    assert counts == {"converted": 2, "reused": 1}
    onnx.checker.check_model(str(path))
    path.with_name(path.name + ".sha256").unlink()  # written before its digest: converted again too
    _probe_file(info, info.candidates[0], "onnx", "fp32", counts)
    assert counts == {"converted": 3, "reused": 1} and sorted(p.name for p in path.parent.iterdir()) == [
        path.name, path.name + ".sha256"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_ends_a_local_bench_and_leaves_nothing(digits_exports, tmp_path, signum):
    """A cancelled CI job or `timeout` sends SIGTERM, Ctrl-C SIGINT, a closed terminal SIGHUP: mixdeploy
    unwinds (exit 128 + N, one line), kills the benchmark it started (it ran on, orphaned) and removes
    its work folders; a second signal does not cut that short. Started under nohup, it ignores SIGHUP
    as nohup asks."""
    from conftest import HEARTBEAT

    exe = Path(sys.executable).with_name("mixdeploy")
    nohup = [] if signum == signal.SIGHUP else ["nohup"]
    # started with SIGHUP and SIGINT as a terminal gives them, whatever this test's own launcher ignored
    defaults = ("import os, signal, sys; [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGHUP, signal.SIGINT)]; "
                "os.execvp(sys.argv[1], sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", defaults, *nohup, exe, "bench", digits_exports["fp32.onnx"], "--runs",
                             "100000000", "--parity", digits_exports["eval"], "--parity-samples", "2"],
                            env={**os.environ, "TMPDIR": str(tmp_path)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not [c for c in processes_mentioning(str(tmp_path)) if c.startswith(sys.executable) and "runner.py bench" in c]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1)  # the benchmark runs, under the shell that started it
    if nohup:
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None
    proc.send_signal(signum)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:  # more signals all through the clean-up
        time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and [line for line in stderr.splitlines() if not HEARTBEAT.match(line)] == [
        f"mixdeploy: stopped by {signum.name}"], stderr
    assert not [name for name in os.listdir(tmp_path) if name.startswith("mixdeploy")]
    assert not still_running(str(tmp_path))
