"""ARM Linux boards over OpenSSH (key authentication, never a password prompt)."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from mixnet_deploy.errors import DeviceError, MixdeployError

from .transport import ShellResult, Transport, check_port, run_host

INSTALL = "install an OpenSSH client (Debian/Ubuntu: apt-get install openssh-client)"
MARK = "mixdeploy-file-starts-here:"


class SshTransport(Transport):
    """USER@HOST[:PORT]; extra ssh options (e.g. `-i KEY`) come from $MIXDEPLOY_SSH_OPTIONS."""

    python = "python3"

    def __init__(self, target: str, timeout: float = 30) -> None:
        super().__init__()
        match = re.fullmatch(r"(?:([\w.\-]+)@)?([\w.\-]+|\[[0-9a-fA-F:]+\])(?::(\d+))?", target)
        if not match:
            raise MixdeployError(f"device ssh:{target}: give ssh:USER@HOST or ssh:USER@HOST:PORT")
        user, self.host, port = match.groups()
        if self.host.startswith("-") or (user or "").startswith("-"):  # ssh would read it as an option
            raise MixdeployError(f"device ssh:{target}: a user or host cannot start with '-'")
        check_port(port, f"ssh:{target}")
        self.name = f"ssh:{target}"
        host = self.host.strip("[]")  # an IPv6 literal: brackets only in our ssh:USER@[ADDR]:PORT form
        self.destination = f"{user}@{host}" if user else host
        try:
            extra = shlex.split(os.environ.get("MIXDEPLOY_SSH_OPTIONS", ""))
        except ValueError as exc:
            raise MixdeployError(f"MIXDEPLOY_SSH_OPTIONS cannot be split like a shell line ({exc}); "
                                 "balance its quotes") from None
        # a board that dies mid-run: ssh gives up after 15 s of silence (exit 255, "ssh ... failed"), not at --timeout
        # the user's options first: ssh keeps the first value of each
        self.options = [*extra, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}", "-o",
                        "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        self.port = ["-p", port] if port else []  # none given: ~/.ssh/config's Port, else 22
        self.tmp_root = self._tmp_root()  # Termux has no /tmp; this also checks that the board answers

    def _ssh(self, command: str, timeout: float, stdin: str | None = None, stdout: str | None = None) -> ShellResult:
        """ssh HOST COMMAND; its input from, or its output to, a host file when given. A failed
        connection (exit 255) is a DeviceError."""
        # the login shell reads the line: it may be fish or csh, so it hands the command to sh (exec: same process group)
        result = run_host(["ssh", *self.options, *self.port, self.destination, "exec sh -c " + shlex.quote(command)],
                          timeout, INSTALL, stdin=stdin, stdout=stdout)
        if result.code == 255:
            raise _failed(f"ssh to {self.destination}", result)
        return result

    def _shell(self, command: str, timeout: float) -> ShellResult:
        return self._ssh(command, timeout)

    def _copy(self, what: str, command: str, stdin: str | None = None, stdout: str | None = None) -> None:
        """Files go through ssh itself (`cat`), not scp: boards without an sftp-server (Dropbear,
        OpenWrt) take them, and $MIXDEPLOY_SSH_OPTIONS mean the same for every copy."""
        result = self._ssh(command, 600, stdin=stdin, stdout=stdout)
        if result.code != 0:
            raise _failed(what, result)

    def push(self, local: Path | str, remote: str) -> None:
        self._copy(f"copying {Path(local).name} to {self.name}:{remote}", "cat > " + shlex.quote(remote), stdin=str(local))

    def pull(self, remote: str, local: Path | str) -> None:
        # after a marker: what the board's login files print (a banner in .bashrc) comes first
        self._copy(f"copying {self.name}:{remote}", f"printf %s {MARK}; cat {shlex.quote(remote)}", stdout=str(local))
        data = Path(local).read_bytes()
        Path(local).write_bytes(data[data.index(MARK.encode()) + len(MARK):])


def _failed(what: str, result: ShellResult) -> DeviceError:
    """`WHAT failed: the last line ssh printed` (or its exit code)."""
    lines = result.stderr.strip().splitlines()
    return DeviceError(f"{what} failed: {lines[-1] if lines else f'exit {result.code}'}")
