"""Android devices (and anything that speaks adb) through the `adb` client of platform-tools."""
from __future__ import annotations

import os
import re
from pathlib import Path

from mixnet_deploy.errors import DeviceError, MixdeployError

from .transport import ShellResult, Transport, check_port, run_host

INSTALL = "install Android platform-tools (Debian/Ubuntu: apt-get install adb) and put adb on PATH"
# what the adb client prints when the device, not the command, failed
LOST = re.compile(r"^(adb: )?error: (failed to get feature set: )?(device .*not found|device offline|closed|no devices/emulators found|"
                  r"protocol fault.*|connection reset.*)", re.M)
STATES = {
    "offline": "is offline: reconnect it (`adb disconnect {s}; adb connect {s}` for a network device, else replug USB)",
    "unauthorized": "is unauthorized: unlock it and accept the USB debugging prompt, then retry",
    "no permissions": "cannot be opened (no permissions): fix the udev rules for USB devices",
}


def adb(args: list[str], timeout: float) -> ShellResult:
    """Run the adb client."""
    return run_host(["adb", *args], timeout, INSTALL)


def device_states(timeout: float = 30) -> dict[str, str]:
    """Serial -> state, as `adb devices` lists them."""
    result = adb(["devices"], timeout)
    if result.code != 0:
        raise DeviceError(f"adb devices failed: {(result.stderr or result.stdout).strip()}")
    states = {}
    for line in result.stdout.splitlines()[1:]:
        if "\t" in line:
            serial, state = line.split("\t", 1)
            states[serial.strip()] = state.strip()
    return states


class AdbTransport(Transport):
    """One adb device by serial; a network serial (HOST:PORT) is `adb connect`ed when not listed."""

    python = "python3"

    def __init__(self, serial: str, timeout: float = 30) -> None:
        super().__init__()
        if not serial.strip():
            raise MixdeployError("device adb: names no device; give adb:SERIAL (see `adb devices`)")
        network = re.fullmatch(r"[\w.\-]+:(\d+)", serial)
        check_port(network and network.group(1), serial)
        self.serial = serial
        self.name = f"adb:{serial}"
        state = device_states(timeout).get(serial)
        if state == "offline" and network:  # an entry left by an earlier connection: connect afresh
            adb(["disconnect", serial], timeout)
            state = None
        if state is None and network:
            connect = adb(["connect", serial], timeout)
            state = device_states(timeout).get(serial)
            if state in (None, "offline"):  # adb exits 0 on a failed connect too, leaving an offline entry
                adb(["disconnect", serial], timeout)
                said = [line for line in (connect.stdout + "\n" + connect.stderr).splitlines() if line.strip()]
                raise DeviceError(f"could not connect to adb device {serial}: {said[-1].strip() if said else 'no answer'}; "
                                  "check that adbd listens there (`adb tcpip PORT` on the phone)")
        if state is None:
            listed = ", ".join(device_states(timeout)) or "none"
            raise DeviceError(f"adb device {serial} not found (adb devices lists: {listed}); "
                              "check the cable or `adb connect HOST:PORT`")
        if state != "device":
            known = next((key for key in STATES if state.startswith(key)), None)  # adb adds advice to some states
            raise DeviceError(f"adb device {serial} " + (STATES[known].format(s=serial) if known else f"is {state}"))
        self.tmp_root = self._tmp_root()

    def _checked(self, args: list[str], timeout: float) -> ShellResult:
        """adb -s SERIAL ARGS; a lost device becomes a DeviceError."""
        result = adb(["-s", self.serial, *args], timeout)
        lost = LOST.search(result.stderr) or (LOST.search(result.stdout) if result.code else None)
        if lost:
            raise DeviceError(f"lost adb device {self.serial} during `adb {args[0]}`: {lost.group(0).strip()}")
        return result

    def _shell(self, command: str, timeout: float) -> ShellResult:
        return self._checked(["shell", command], timeout)

    def _copy(self, verb: str, source: str, target: str) -> None:
        result = self._checked([verb, source, target], 600)
        if result.code != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise DeviceError(f"adb {verb} {source} to {self.serial}:{target} failed: {detail[-1] if detail else ''}")

    def push(self, local: Path | str, remote: str) -> None:
        self._copy("push", os.path.abspath(local), remote)  # absolute: a name starting with '-' is no option

    def pull(self, remote: str, local: Path | str) -> None:
        self._copy("pull", remote, os.path.abspath(local))
