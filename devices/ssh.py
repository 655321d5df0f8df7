"""ARM Linux boards over OpenSSH (ssh and scp, key authentication, never a password prompt)."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from mixnet_deploy.errors import DeviceError, MixdeployError

from .transport import ShellResult, Transport, check_port, run_host

INSTALL = "install an OpenSSH client (Debian/Ubuntu: apt-get install openssh-client)"


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
        self.destination = f"{user}@{self.host}" if user else self.host
        try:
            extra = shlex.split(os.environ.get("MIXDEPLOY_SSH_OPTIONS", ""))
        except ValueError as exc:
            raise MixdeployError(f"MIXDEPLOY_SSH_OPTIONS cannot be split like a shell line ({exc}); "
                                 "balance its quotes") from None
        # a board that dies mid-run: ssh gives up after 15 s of silence (exit 255, "ssh ... failed"), not at --timeout
        # the user's options first: ssh keeps the first value of each
        self.options = [*extra, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}", "-o",
                        "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        self.port = port or "22"
        self.shell("true", timeout=timeout)

    def _ssh_failed(self, result: ShellResult) -> DeviceError:
        lines = result.stderr.strip().splitlines()
        return DeviceError(f"ssh to {self.destination} failed: {lines[-1] if lines else 'exit 255'}")

    def _shell(self, command: str, timeout: float) -> ShellResult:
        # the login shell reads the line: it may be fish or csh, so it hands the command to sh (exec: same process group)
        result = run_host(["ssh", *self.options, "-p", self.port, self.destination, "exec sh -c " + shlex.quote(command)],
                          timeout, INSTALL)
        if result.code == 255:
            raise self._ssh_failed(result)
        return result

    def _scp(self, source: str, target: str) -> None:
        result = run_host(["scp", "-q", *self.options, "-P", self.port, source, target], 600, INSTALL)
        if result.code != 0:
            raise self._ssh_failed(result)

    def push(self, local: Path | str, remote: str) -> None:
        self._scp(os.path.abspath(local), f"{self.destination}:{remote}")  # absolute: scp reads `a:b` as a host

    def pull(self, remote: str, local: Path | str) -> None:
        self._scp(f"{self.destination}:{remote}", os.path.abspath(local))
