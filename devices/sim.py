"""A virtual ARM64 device for testing on-device runs without a phone: a Debian bookworm arm64 root
filesystem run by qemu-user, served by devices/adbd.py so the real `adb` client connects to it.
Needs root, qemu-user-static, debootstrap, binfmt-support and adb. Emulation is 150-650x slower
than the host: good for correctness on real ARM kernels, meaningless for latency."""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from devices.adb import adb
from devices.adbd import DEVICE_ENV
from mixnet_deploy.errors import DeviceError, MixdeployError

CACHE = Path.home() / ".cache" / "mixdeploy" / "sim"
STATE = CACHE / "state"
MIRROR = "http://deb.debian.org/debian"
APT_PACKAGES = ["python3", "procps"]  # taskset (util-linux) is in minbase
WHEELS = ["ai-edge-litert==2.3.0", "onnxruntime==1.28.0", "numpy==2.4.6"]
WHEEL_TAGS = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
              "--platform", "manylinux_2_27_aarch64", "--platform", "manylinux2014_aarch64",
              "--platform", "manylinux_2_17_aarch64"]  # litert 2.3.0 exists only as manylinux_2_27
BUILD_VERSION = "1 bookworm " + " ".join(APT_PACKAGES + WHEELS)
MARKER = ".mixdeploy-sim"
SITE = "usr/local/lib/python3.11/dist-packages"  # on the device's python3 path
PROPS = {"ro.product.name": "mixdeploy_sim", "ro.product.model": "mixdeploy-arm64-sim",
         "ro.product.device": "arm64", "ro.product.cpu.abi": "arm64-v8a", "ro.kernel.qemu": "1"}
# Outside 5555-5585, the ports the adb server probes for emulators when it starts: there the device
# would be listed twice, once more as emulator-5554.
PORT = 5600
INSTALL = "apt-get install qemu-user-static debootstrap binfmt-support adb"
# Linux arm64 hwcap names by bit (arch/arm64/kernel/cpuinfo.c), AT_HWCAP then AT_HWCAP2.
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
         "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg")
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm "
          "svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 "
          "smef16f32 smeb16f32 smef32f32 smefa64 wfxt ebf16 sveebf16")


def rootfs_path() -> Path:
    """Where the arm64 root filesystem lives (env MIXDEPLOY_SIM_ROOTFS overrides)."""
    return Path(os.environ.get("MIXDEPLOY_SIM_ROOTFS") or CACHE / "arm64-bookworm")


def is_built(rootfs: Path | None = None) -> bool:
    """True when a complete root filesystem of this build version is there."""
    marker = (rootfs or rootfs_path()) / MARKER
    return marker.is_file() and marker.read_text().strip() == BUILD_VERSION


def require_tools() -> None:
    """Raise MixdeployError naming what to install when this machine cannot run the simulator."""
    missing = [tool for tool in ("qemu-aarch64-static", "debootstrap", "update-binfmts", "adb")
               if not shutil.which(tool)]
    if missing:
        raise MixdeployError(f"the ARM64 simulator needs {', '.join(missing)}: run `{INSTALL}` as root")
    if os.geteuid() != 0:
        raise MixdeployError("the ARM64 simulator needs root (chroot, mount, binfmt_misc): run it as root")


def build(rebuild: bool = False) -> Path:
    """Build the root filesystem unless a complete one is there (a few minutes; progress on stderr).
    It is built beside its final place and renamed when complete, so a half-built one is never used."""
    require_tools()
    rootfs = rootfs_path()
    if is_built(rootfs) and not rebuild:
        return rootfs
    if status()["running"]:
        raise MixdeployError("the ARM64 simulator is running on the root filesystem to rebuild: stop it first")
    tmp = rootfs.with_name(rootfs.name + ".building")
    _remove(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    STATE.mkdir(parents=True, exist_ok=True)
    log = STATE / "build.log"
    log.write_text("")
    wheels = CACHE / "wheels"
    console, started = Console(stderr=True, markup=False), time.monotonic()
    _enable_binfmt()
    chroot = ["chroot", str(tmp)]
    steps = [  # (what, command, needs /proc, /sys and /dev mounted)
        ("debootstrap, first stage (download)", ["debootstrap", "--arch=arm64", "--foreign",
         "--variant=minbase", "bookworm", str(tmp), MIRROR], False),
        ("debootstrap, second stage (emulated)", [*chroot, "/debootstrap/debootstrap", "--second-stage"], False),
        ("apt-get install " + " ".join(APT_PACKAGES), [*chroot, "/bin/sh", "-c", "apt-get update && apt-get "
         "install -y --no-install-recommends " + " ".join(APT_PACKAGES) + " && apt-get clean"], True),
        ("download aarch64 wheels", [sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels),
                                     *WHEEL_TAGS, *WHEELS], True),
        ("install wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                            "--target", str(tmp / SITE), *WHEEL_TAGS, *WHEELS], True),
        ("check that python3 imports numpy, ai_edge_litert, onnxruntime",
         [*chroot, "python3", "-c", "import numpy, ai_edge_litert, onnxruntime"], True),
    ]
    mounts: list[str] = []
    try:
        for i, (what, argv, needs_mounts) in enumerate(steps, 1):
            if needs_mounts and not mounts:
                shutil.copy("/etc/resolv.conf", tmp / "etc/resolv.conf")
                mounts = _mount(tmp)
            t0 = time.monotonic()
            with console.status(Text(f"sim: [{i}/{len(steps)}] {what}...")):
                _run_logged(argv, log, what)
            console.print(f"sim: [{i}/{len(steps)}] {what}: {time.monotonic() - t0:.0f} s")
    finally:
        _unmount(mounts)
    _write_device_files(tmp)
    _remove(rootfs)
    tmp.rename(rootfs)
    console.print(f"sim: root filesystem ready in {time.monotonic() - started:.0f} s: {rootfs}")
    return rootfs


def start(port: int = PORT) -> dict:
    """Start the virtual device (building the root filesystem if needed) and connect adb to it.
    Returns serial, rootfs, pid and emulated=True; a device already running is returned as is."""
    require_tools()
    current = status()
    if current["running"]:
        if current["port"] != port:
            raise MixdeployError(f"the ARM64 simulator already runs as {current['serial']}: stop it first "
                                 "(mixdeploy device sim stop)")
        _adb_connect(current["serial"])  # the adb server may have been restarted since
        return _device(current)
    stop()  # clear what a crashed daemon left behind
    rootfs = build()
    _require_free(port)
    _enable_binfmt()
    mounts = _mount(rootfs)
    state = {"serial": f"127.0.0.1:{port}", "port": port, "rootfs": str(rootfs), "mounts": mounts}
    (STATE / "device.json").write_text(json.dumps(state))
    package_root = Path(__file__).resolve().parent.parent
    with open(STATE / "adbd.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "devices.adbd", "--rootfs", str(rootfs), "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=package_root,
                                start_new_session=True)
    (STATE / "adbd.pid").write_text(str(proc.pid))
    _wait_listening(proc, port)
    _adb_connect(state["serial"])
    return _device(status())


def stop() -> None:
    """Stop the daemon, disconnect adb and unmount what start mounted (a stopped device is fine)."""
    state = _state()
    pid = _daemon_pid()
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if state.get("serial") and shutil.which("adb"):
        with contextlib.suppress(DeviceError):  # a hung adb server must not keep the mounts
            adb(["disconnect", state["serial"]], 30)
    _unmount(state.get("mounts", []))
    for name in ("device.json", "adbd.pid"):
        (STATE / name).unlink(missing_ok=True)


def status() -> dict:
    """Whether the virtual device runs, its serial and pid, and whether the root filesystem is built."""
    state, pid = _state(), _daemon_pid()
    return {"running": pid is not None, "serial": state.get("serial") if pid else None,
            "port": state.get("port") if pid else None, "pid": pid, "rootfs": str(rootfs_path()),
            "built": is_built(), "emulated": True}


# --- helpers ---------------------------------------------------------------------------------------
def _device(current: dict) -> dict:
    return {key: current[key] for key in ("serial", "rootfs", "pid", "emulated")}


def _require_free(port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemon: TIME_WAIT is no obstacle
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise MixdeployError(f"port {port} on 127.0.0.1 is in use: start the simulator on another port") from None


def _run_logged(argv: list[str], log: Path, what: str) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **DEVICE_ENV, "DEBIAN_FRONTEND": "noninteractive"})
    if done.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise DeviceError(f"sim build: {what} failed ({lines[-1] if lines else 'no output'}): see {log}")


def _host(argv: list[str], what: str, **kwargs) -> str:
    """Run a host command; a failure is a DeviceError saying what did not work."""
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise DeviceError(f"sim: {what} failed" + (f": {detail[-1]}" if detail else ""))
    return done.stdout


def _enable_binfmt() -> None:
    """Let the kernel run arm64 programs through qemu-aarch64 (also inside the chroot)."""
    if not os.path.ismount("/proc/sys/fs/binfmt_misc"):
        _host(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], "mounting binfmt_misc")
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not (entry.exists() and entry.read_text().startswith("enabled")):
        _host(["update-binfmts", "--enable", "qemu-aarch64"], "update-binfmts --enable qemu-aarch64")


def _mount(rootfs: Path) -> list[str]:
    """Bind /proc, /sys and /dev into the rootfs (private, so nothing propagates back to the host),
    an ARM64 /proc/cpuinfo matching the emulated CPU, and a cpufreq view; returns the mount points."""
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "cpuinfo").write_text(_cpuinfo(rootfs))
    _fake_cpu_sysfs(STATE / "sys-cpu")
    binds = [("/proc", "proc"), ("/sys", "sys"), ("/dev", "dev"), ("/dev/shm", "dev/shm"),
             (str(STATE / "cpuinfo"), "proc/cpuinfo"), (str(STATE / "sys-cpu"), "sys/devices/system/cpu")]
    mounted: list[str] = []
    try:
        for source, target in binds:
            point = str(rootfs / target)
            _host(["mount", "--bind", "--make-private", source, point], f"mounting {point}")
            mounted.append(point)
    except DeviceError:
        _unmount(mounted)
        raise
    return mounted


def _unmount(points: list[str]) -> None:
    for point in reversed(points):
        subprocess.run(["umount", "--lazy", point], capture_output=True)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


def _remove(path: Path) -> None:
    """Delete a root filesystem, never through a bind mount into the host's /dev or /proc."""
    if not path.exists():
        return
    _unmount(sorted(_mounts_under(path)))
    if _mounts_under(path):
        raise DeviceError(f"sim: {path} still has mounts inside: unmount them, then retry")
    shutil.rmtree(path)


def _cpuinfo(rootfs: Path) -> str:
    """/proc/cpuinfo text of QEMU's emulated `max` CPU: features from the auxiliary vector it gives
    programs, MIDR of QEMU's max CPU (implementer 0, part 'Q'), one entry per host core."""
    out = _host(["chroot", str(rootfs), "/usr/bin/env", "LD_SHOW_AUXV=1", "/bin/true"],
                "running an arm64 program (qemu-aarch64 through binfmt_misc)", env={**os.environ, **DEVICE_ENV})
    caps = dict(re.findall(r"^(AT_HWCAP2?):\s+(?:0x)?([0-9a-f]+)", out, re.M))
    hwcap, hwcap2 = int(caps.get("AT_HWCAP", "0"), 16), int(caps.get("AT_HWCAP2", "0"), 16)
    names = [n for bit, n in enumerate(HWCAP.split()) if hwcap >> bit & 1]
    names += [n for bit, n in enumerate(HWCAP2.split()) if hwcap2 >> bit & 1]
    entry = ("processor\t: {}\nBogoMIPS\t: 2000.00\nFeatures\t: " + " ".join(names) +
             "\nCPU implementer\t: 0x00\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0x051\n"
             "CPU revision\t: 0\n\n")
    return "".join(entry.format(i) for i in range(os.cpu_count() or 1))


def _fake_cpu_sysfs(root: Path) -> None:
    """A copy of the host's /sys/devices/system/cpu lists and topology plus a cpufreq folder per core
    (all cores equal: no fake big.LITTLE), so tools that read cpuinfo_max_freq find it."""
    shutil.rmtree(root, ignore_errors=True)
    host = Path("/sys/devices/system/cpu")
    for name in ("online", "possible", "present", "kernel_max"):
        if (host / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text((host / name).read_text())
    for i in range(os.cpu_count() or 1):
        for f in (host / f"cpu{i}/topology").glob("*"):
            if f.is_file():
                (root / f"cpu{i}/topology").mkdir(parents=True, exist_ok=True)
                (root / f"cpu{i}/topology" / f.name).write_text(f.read_text())
        freq = root / f"cpu{i}/cpufreq"
        freq.mkdir(parents=True, exist_ok=True)
        for name, value in (("cpuinfo_max_freq", "2000000"), ("cpuinfo_min_freq", "2000000"),
                            ("scaling_cur_freq", "2000000"), ("scaling_governor", "performance")):
            (freq / name).write_text(value + "\n")


def _write_device_files(rootfs: Path) -> None:
    """Android-like touches: /data/local/tmp, a getprop answering a few ro.* properties; the marker.
    pip --target also left scripts for the host's interpreter: they go."""
    shutil.rmtree(rootfs / SITE / "bin", ignore_errors=True)
    tmp = rootfs / "data/local/tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o1777)
    cases = "".join(f"  {key}) echo {value} ;;\n" for key, value in PROPS.items())
    getprop = rootfs / "usr/local/bin/getprop"
    getprop.write_text(f'#!/bin/sh\ncase "$1" in\n{cases}  "") '
                       + "; ".join(f"echo '[{k}]: [{v}]'" for k, v in PROPS.items()) + " ;;\nesac\n")
    getprop.chmod(0o755)
    (rootfs / MARKER).write_text(BUILD_VERSION + "\n")


def _state() -> dict:
    try:
        return json.loads((STATE / "device.json").read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of this process is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _daemon_pid() -> int | None:
    """The adbd pid from the pid file, if that process still is our adbd."""
    try:
        pid = int((STATE / "adbd.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"devices.adbd" in cmdline and _alive(pid) else None


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = (STATE / "adbd.log").read_text(errors="replace").strip().splitlines()
            stop()
            raise DeviceError(f"sim: adbd exited at start ({lines[-1] if lines else 'no output'}): "
                              f"see {STATE / 'adbd.log'}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    stop()
    raise DeviceError(f"sim: adbd did not listen on 127.0.0.1:{port} within {timeout:g} s: see {STATE / 'adbd.log'}")


def _adb_connect(serial: str, timeout: float = 20) -> None:
    """`adb connect` until get-state says device (after a daemon restart adb shows offline until it
    disconnects and connects again)."""
    deadline = time.monotonic() + timeout
    try:
        for attempt in itertools.count():
            if adb(["-s", serial, "get-state"], 30).stdout.strip() == "device":
                return
            if time.monotonic() > deadline:
                raise DeviceError(f"sim: adb does not see {serial} as a device within {timeout:g} s: "
                                  f"see {STATE / 'adbd.log'}")
            if attempt % 10 == 0:
                adb(["disconnect", serial], 30)
                adb(["connect", serial], 30)
            time.sleep(0.2)
    except DeviceError:  # a hung adb server too: the daemon and its mounts go
        stop()
        raise
