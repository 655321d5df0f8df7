"""One interface for every device: shell (exit code, timeout), push, pull, a work folder that is
always removed, and what the device is (ABI, cores, governor, temperatures, memory)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from mixnet_deploy.errors import DeviceError, DeviceTimeout, MixdeployError

from .atomic import write_atomic


@dataclass
class ShellResult:
    """What a command printed and its exit code."""

    code: int
    stdout: str
    stderr: str


class Transport:
    """Base of the local, adb and ssh devices. Subclasses implement `_shell`, `push` and `pull`;
    commands are argument lists, quoted here for the device's shell."""

    name = "device"
    tmp_root = "/tmp"

    def __init__(self) -> None:
        self._workdir: str | None = None
        self._lock: IO[str] | None = None  # held from reserve() to cleanup(): one mixdeploy run per device
        self._commands = 0  # numbered in the work folder's .pgid, with their process group
        self._cut = 0  # the number of a command cut off (timeout, lost connection, a stop): it may still run there
        self.runtimes: dict[tuple[str, str], str] = {}  # (python, format) -> "module version" there, asked once

    # --- what subclasses provide -------------------------------------------------------------
    def _shell(self, command: str, timeout: float) -> ShellResult:
        """Run one shell command line on the device."""
        raise NotImplementedError

    def push(self, local: Path | str, remote: str) -> None:
        """Copy a host file to the device."""
        raise NotImplementedError

    def pull(self, remote: str, local: Path | str) -> None:
        """Copy a device file to the host."""
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------
    def shell(self, argv: list[str] | str, timeout: float = 60, check: bool = True) -> ShellResult:
        """Run a command (a list is quoted word by word; a string is a shell line we built ourselves).
        With check, a non-zero exit is a DeviceError naming the command and its stderr."""
        command = argv if isinstance(argv, str) else shlex.join(argv)
        self._commands += 1
        line = command if self._workdir is None else (  # its process group, for cleanup() to stop if we are cut off
            f"echo $$ {self._commands} > {shlex.quote(self._workdir + '/.pgid')}; {command}")
        try:
            result = self._shell(line, timeout)
        except BaseException as exc:
            self._cut = self._commands
            if isinstance(exc, DeviceTimeout):  # named by what ran on the device, not by adb's or ssh's options
                raise DeviceTimeout(f"{self.name}: `{command[:80]}` timed out after {exc.seconds:g} s", exc.seconds) from None
            raise
        if check and result.code != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise DeviceError(f"{self.name}: `{command[:80]}` failed with exit code {result.code}"
                              + (f": {detail[-1]}" if detail else ""))
        return result

    @property
    def workdir(self) -> str:
        """A fresh folder on the device for this run, created on first use; folders left behind by
        runs that lost this device are removed first."""
        if self._workdir is None:
            with _stale() as stale:
                if stale.get(self.name):
                    folders = stale.pop(self.name)
                    self._shell("".join(map(_stop_in, folders)) + shlex.join(["rm", "-rf", *folders]), 60)
            made = self.shell(["mktemp", "-d", f"{self.tmp_root}/mixdeploy.XXXXXX"]).stdout.strip()
            self._workdir = made.splitlines()[-1] if made else ""  # after anything the login files printed
            if not self._workdir.startswith("/"):
                raise DeviceError(f"{self.name}: mktemp printed no folder ({made[-80:]!r})")
        return self._workdir

    def _tmp_root(self) -> str:
        """The first writable of Android's shell folder, $TMPDIR (Termux sets it) and /tmp."""
        probe = self.shell('for d in /data/local/tmp "${TMPDIR:-/tmp}" /tmp; do '
                           '[ -d "$d" ] && [ -w "$d" ] && echo "$d" && break; done; true', timeout=30)
        found = probe.stdout.strip().splitlines()
        return found[-1] if found else "/tmp"

    def reserve(self, step: Callable[[str], None] = lambda _: None) -> None:
        """Wait until no other mixdeploy run on this host uses this device, as named by --device (two
        runs would time each other), then hold it until cleanup(). A HOME that cannot be written: no lock."""
        if self._lock is not None:
            return
        path = LOCKS / (re.sub(r"[^\w.\-]", "_", self.name) + ".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(path, "a+")  # noqa: SIM115 - held until cleanup()
        except OSError:
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            step(f"waiting for another mixdeploy run on {self.name} (pid {holder}) to finish")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except BaseException:  # a stop while waiting
                lock.close()
                raise
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def cleanup(self) -> None:
        """Stop a command that was cut off (ssh and adb leave it running on the device: their device
        side starts every command as a process group of its own), remove the work folder; if the
        device is gone, remember the folder for the next connection."""
        if self._workdir is not None:
            # the cut command's group, if that command started (else .pgid names an earlier one's, its id maybe reused)
            stop = (f"read pg n < {shlex.quote(self._workdir + '/.pgid')} && [ \"$n\" = {self._cut} ] && "
                    "kill -9 -$pg 2>/dev/null; ") if self._cut else ""
            try:
                self._shell(stop + shlex.join(["rm", "-rf", self._workdir]), 30)
            except BaseException as exc:  # a lost device, or a stop (Ctrl-C) meanwhile: removed next time
                with _stale() as stale:
                    stale.setdefault(self.name, []).append(self._workdir)
                if not isinstance(exc, DeviceError):
                    raise
            finally:
                self._workdir, self._cut = None, 0
                self._release()
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing releases the lock
            self._lock = None

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


STALE = Path.home() / ".cache" / "mixdeploy" / "stale-workdirs.json"
LOCKS = STALE.parent / "locks"  # one file per device name, locked while a run uses the device


def _stop_in(folder: str) -> str:
    """Shell code that kills the process group of the last command run in a work folder left behind
    when the device was lost, if a process of that group still has the folder on its command line (a
    group id reused since is left alone). Its leader may be gone: a hang-up ends the shell, while
    what the shell started runs on."""
    pgid, path = shlex.quote(folder + "/.pgid"), shlex.quote(folder)
    return (f"read pg _ < {pgid} 2>/dev/null && for p in /proc/[0-9]*; do "
            "{ read -r s < $p/stat; } 2>/dev/null || continue; set -- ${s##*) }; "  # after the command name: state ppid pgrp
            f"[ \"$3\" = \"$pg\" ] && tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -qF {path} "
            "&& kill -9 -$pg 2>/dev/null && break; done; ")


@contextlib.contextmanager
def _stale() -> Iterator[dict[str, list[str]]]:
    """Device name -> work folders left on it by runs that lost the device; read, then written back
    when changed, under a lock (benches on two devices at once)."""
    try:
        STALE.parent.mkdir(parents=True, exist_ok=True)
        lock = open(STALE.with_name(STALE.name + ".lock"), "w")  # noqa: SIM115 - closed below
    except OSError:  # a HOME that cannot be written: nothing recorded, nothing to clean up
        yield {}
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            stale = json.loads(STALE.read_text())
        except (OSError, ValueError):
            stale = {}
        before = json.dumps(stale)
        yield stale
        if json.dumps(stale) != before:
            write_atomic(STALE, json.dumps(stale).encode())


def run_host(argv: list[str], timeout: float, what: str, stdin: str | None = None,
             stdout: str | None = None) -> ShellResult:
    """Run a host command (adb, ssh, a local shell); a missing program or a timeout is a DeviceError.
    The command runs in a process group of its own, killed whole on a timeout or when mixdeploy is
    stopped (a shell's children, such as a local benchmark, would otherwise run on). Its input is
    the file `stdin`, else empty: adb and ssh forward theirs to the device, and would eat a calling
    script's input. Its output goes to the file `stdout` when given (the result's stdout is then "")."""
    with contextlib.ExitStack() as files:
        source = files.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
        sink = files.enter_context(open(stdout, "wb")) if stdout else subprocess.PIPE
        try:
            proc = subprocess.Popen(argv, stdin=source, stdout=sink, stderr=subprocess.PIPE, start_new_session=True)
        except FileNotFoundError:
            raise DeviceError(f"{argv[0]} not found: {what}") from None
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # the whole group may have ended meanwhile
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):  # a process that left the group may hold the pipes
                proc.communicate(timeout=5)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise DeviceTimeout(f"`{shlex.join(argv)[:100]}` timed out after {timeout:g} s", timeout) from None
            raise
    return ShellResult(proc.returncode, (out or b"").decode(errors="replace"), err.decode(errors="replace"))


def check_port(port: str | None, device: str) -> None:
    """A usage error unless `port` (digits, or None for the default) is a TCP port."""
    if port and not 0 < int(port) < 65536:
        raise MixdeployError(f"device {device}: port {port} is not a TCP port (1-65535)")
