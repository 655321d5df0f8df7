"""`--device` to a transport: local, adb:SERIAL or a bare SERIAL, ssh:USER@HOST[:PORT]."""
from __future__ import annotations

from mixnet_deploy.errors import DeviceError, MixdeployError

from .transport import Transport


def open_device(spec: str) -> Transport:
    """The transport for a --device value; errors say what is wrong with the device."""
    if not spec.strip():
        raise MixdeployError("the device is empty; give local, an adb SERIAL (see `adb devices`), adb:SERIAL or "
                             "ssh:USER@HOST[:PORT]")
    if spec.lower() == "local":  # `Local`: this machine, not an adb serial
        from .local import LocalTransport

        return LocalTransport()
    if spec.startswith("ssh:"):
        from .ssh import SshTransport

        return SshTransport(spec[4:])
    from .adb import AdbTransport

    if spec.startswith("adb:") or ":" in spec:  # asked for adb, or a network serial HOST:PORT
        return AdbTransport(spec.removeprefix("adb:"))
    try:
        return AdbTransport(spec)
    except DeviceError as exc:  # a mistyped `local` reads as a serial too
        raise DeviceError(f"{exc} (--device {spec} was taken as an adb serial; the other forms: local, "
                          "ssh:USER@HOST[:PORT])") from None
