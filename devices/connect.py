"""`--device` to a transport: local, adb:SERIAL or a bare SERIAL, ssh:USER@HOST[:PORT]."""
from __future__ import annotations

from .transport import Transport


def open_device(spec: str) -> Transport:
    """The transport for a --device value; errors say what is wrong with the device."""
    if spec == "local":
        from .local import LocalTransport

        return LocalTransport()
    if spec.startswith("ssh:"):
        from .ssh import SshTransport

        return SshTransport(spec[4:])
    from .adb import AdbTransport

    return AdbTransport(spec.removeprefix("adb:"))
