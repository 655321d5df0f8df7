"""A device-side adb daemon in plain Python: the real `adb` client connects to it over TCP
(`adb connect 127.0.0.1:PORT`) and runs shell commands and file transfers inside a root filesystem
through chroot. Transport protocol: 24-byte headers, streams opened by OPEN and flow-controlled by
OKAY (one WRTE in flight per stream); it never asks for AUTH.

    python -m devices.adbd --rootfs ROOTFS --port 5600
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import struct
from functools import partial

VERSION = 0x01000001
MAX_DATA = 256 * 1024
SYNC_CHUNK = 64 * 1024
BANNER = (b"device::ro.product.name=mixdeploy_sim;ro.product.model=mixdeploy-arm64-sim;"
          b"ro.product.device=arm64;features=cmd,stat_v2,fixed_push_mkdir,shell_v2")
# QEMU's SME emulation gives wrong XNNPACK int8 results: every device command runs without it.
DEVICE_ENV = {"QEMU_CPU": "max,sme=off", "HOME": "/root", "LANG": "C.UTF-8",
              "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
CNXN, OPEN, OKAY, WRTE, CLSE = (int.from_bytes(c, "little") for c in (b"CNXN", b"OPEN", b"OKAY", b"WRTE", b"CLSE"))
HEADER = struct.Struct("<6I")
STAT2 = struct.Struct("<4sIQQIIIIQqqq")
DENT = struct.Struct("<4sIIII")
GROUPS: set[int] = set()  # process groups of the commands running, or cut off by the host and maybe running on
log = logging.getLogger("adbd")


class Closed(Exception):
    """The host closed the stream or the connection."""


class Stream:
    """One adb stream: our id, the host's id, data the host wrote, and whether we may write."""

    def __init__(self, conn: Connection, local: int, remote: int) -> None:
        self.conn, self.local, self.remote = conn, local, remote
        self.incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.ready = asyncio.Event()  # set while no WRTE of ours waits for the host's OKAY
        self.ready.set()
        self.lock = asyncio.Lock()
        self.buffer = b""
        self.closed = False

    async def write(self, data: bytes) -> None:
        """Send data as WRTE messages, each after the host acknowledged the previous one."""
        async with self.lock:
            for start in range(0, len(data), self.conn.max_data):
                await self.ready.wait()
                if self.closed:
                    raise Closed
                self.ready.clear()
                self.conn.send(WRTE, self.local, self.remote, data[start:start + self.conn.max_data])
                try:
                    await self.conn.writer.drain()
                except ConnectionError:
                    raise Closed from None

    async def _fill(self) -> bool:
        """Take the host's next WRTE into the buffer and acknowledge it; False once the host closed."""
        data = await self.incoming.get()
        if data is None:
            self.incoming.put_nowait(None)
            return False
        self.buffer += data
        self.conn.send(OKAY, self.local, self.remote)
        return True

    async def read_exact(self, size: int) -> bytes:
        """Exactly size bytes of what the host wrote (Closed if it closes first)."""
        while len(self.buffer) < size:
            if not await self._fill():
                raise Closed
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def wait_closed(self) -> None:
        """Discard what the host writes until it closes the stream."""
        while await self._fill():
            self.buffer = b""

    def close(self) -> None:
        """Close once: forget the stream and tell the host (also the answer to the host's CLSE)."""
        if not self.closed:
            self.closed = True
            self.conn.streams.pop(self.local, None)
            self.conn.send(CLSE, self.local, self.remote)
        self.ready.set()
        self.incoming.put_nowait(None)


class Connection:
    """One TCP connection from the adb server: messages in, streams out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, root: str) -> None:
        self.reader, self.writer, self.root = reader, writer, root
        self.streams: dict[int, Stream] = {}
        self.tasks: set[asyncio.Task] = set()
        self.next_id, self.max_data, self.alive = 1, MAX_DATA, True

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        if self.alive:  # after the connection dropped there is no one to tell
            self.writer.write(HEADER.pack(command, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF,
                                          command ^ 0xFFFFFFFF) + data)

    async def run(self) -> None:
        """Read messages until the host goes away, then close every stream."""
        log.info("connection from %s", self.writer.get_extra_info("peername"))
        try:
            while True:
                command, arg0, arg1, length, _, magic = HEADER.unpack(await self.reader.readexactly(HEADER.size))
                if magic != command ^ 0xFFFFFFFF:
                    log.warning("bad message header; closing the connection")
                    break
                self.dispatch(command, arg0, arg1, await self.reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.alive = False
            for stream in list(self.streams.values()):
                stream.close()
            self.writer.close()
            log.info("connection closed")

    def dispatch(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        stream = self.streams.get(arg1)
        if command == CNXN:
            self.max_data = min(arg1, MAX_DATA)
            self.send(CNXN, VERSION, MAX_DATA, BANNER)
        elif command == OPEN:
            self.open(arg0, data.rstrip(b"\0").decode(errors="replace"))
        elif command == OKAY and stream:
            stream.ready.set()
        elif command == WRTE and stream:
            stream.incoming.put_nowait(data)
        elif command == CLSE and stream:
            stream.close()

    def open(self, remote: int, service: str) -> None:
        """OPEN: shell, exec and sync get a stream and a task; anything else (reboot:, ...) a CLSE."""
        name, _, arg = service.partition(":")
        kind, *options = name.split(",")
        if kind in ("shell", "exec"):
            handler = partial(shell, command=arg, v2="v2" in options, pty="pty" in options)
        elif kind == "sync":
            handler = sync
        else:
            log.info("refused service %r", service[:100])
            self.send(CLSE, 0, remote)
            return
        stream = self.streams[self.next_id] = Stream(self, self.next_id, remote)
        self.next_id += 1
        self.send(OKAY, stream.local, remote)
        log.info("stream %d: %s", stream.local, service[:100])
        task = asyncio.create_task(self.serve(handler, stream))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, handler, stream: Stream) -> None:
        try:
            await handler(self.root, stream)
        except Closed:
            pass
        except Exception:
            log.exception("stream %d failed", stream.local)
        finally:
            stream.close()


# --- shell ----------------------------------------------------------------------------------------
def packet(kind: int, data: bytes) -> bytes:
    """A shell protocol v2 packet: 0 stdin, 1 stdout, 2 stderr, 3 exit code, 4 close stdin, 5 window size."""
    return struct.pack("<BI", kind, len(data)) + data


def hang_up(proc: asyncio.subprocess.Process) -> None:
    """What Android's adbd does when the host closes a shell stream first (shell_service.cpp): SIGHUP
    to the shell only; what the shell started runs on."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGHUP)


async def shell(root: str, stream: Stream, command: str, v2: bool, pty: bool) -> None:
    """Run `sh -c COMMAND` in the rootfs, in a session of its own (as adbd does). With v2: stdin
    forwarded, stdout and stderr apart, exit code sent; legacy: stdout and stderr merged. Output
    streams as it comes; the host's close hangs up the shell."""
    if pty and not command:
        message = b"mixdeploy sim: no interactive shell; run `adb shell COMMAND`\n"
        await stream.write(packet(2, message) + packet(3, b"\1") if v2 else message)
        return
    argv = ["/bin/sh", "-c", command] if command else ["/bin/sh"]
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        "chroot", root, *argv, stdin=pipe if v2 else asyncio.subprocess.DEVNULL, stdout=pipe,
        stderr=pipe if v2 else asyncio.subprocess.STDOUT, env=DEVICE_ENV, cwd="/", start_new_session=True)
    GROUPS.add(proc.pid)

    async def pump(source: asyncio.StreamReader, kind: int) -> None:
        while chunk := await source.read(SYNC_CHUNK):
            await stream.write(packet(kind, chunk) if v2 else chunk)

    async def watch_input() -> None:
        try:
            while v2:
                kind, size = struct.unpack("<BI", await stream.read_exact(5))
                data = await stream.read_exact(size)
                try:
                    if kind == 0 and not proc.stdin.is_closing():
                        proc.stdin.write(data)
                        await proc.stdin.drain()
                    elif kind == 4:
                        proc.stdin.close()
                except (BrokenPipeError, ConnectionResetError):
                    pass
            await stream.wait_closed()
        except Closed:
            pass

    pumps = [asyncio.create_task(pump(proc.stdout, 1)), *([asyncio.create_task(pump(proc.stderr, 2))] if v2 else [])]
    output = asyncio.gather(*pumps)
    host_closed = asyncio.create_task(watch_input())
    try:
        await asyncio.wait({output, host_closed}, return_when=asyncio.FIRST_COMPLETED)
        if output.done() and not isinstance(output.exception(), Closed):
            output.result()  # a failure of our own is raised
            code = await proc.wait()
            GROUPS.discard(proc.pid)
            if v2:
                await stream.write(packet(3, bytes([code & 0xFF if code >= 0 else 128 - code])))
    finally:
        for task in (*pumps, host_closed):
            task.cancel()
        hang_up(proc)  # the host closed the stream before the command ended
        await proc.wait()


# --- sync (push, pull, stat, list) ----------------------------------------------------------------
def device_path(root: str, path: str) -> str:
    """The host path of a device path: '..' and symlinks (absolute ones too) resolve inside root."""
    parts, real, hops = [p for p in path.split("/") if p not in ("", ".")], [], 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            real = real[:-1]
            continue
        candidate = os.path.join(root, *real, part)
        if not os.path.islink(candidate):
            real.append(part)
            continue
        hops += 1
        if hops > 40:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
        target = os.readlink(candidate)
        real = [] if target.startswith("/") else real
        parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    return os.path.join(root, *real)


async def fail(stream: Stream, message: str) -> None:
    """A sync FAIL: the client prints the message."""
    await stream.write(struct.pack("<4sI", b"FAIL", len(message.encode())) + message.encode())


async def sync(root: str, stream: Stream) -> None:
    """Sync requests until QUIT or a failure (after FAIL the host closes, as with adbd)."""
    while True:
        request, size = struct.unpack("<4sI", await stream.read_exact(8))
        if request == b"QUIT":
            return
        path = (await stream.read_exact(size)).decode(errors="surrogateescape")
        if request == b"STAT":
            try:
                st = os.stat(device_path(root, path))
                await stream.write(struct.pack("<4sIII", b"STAT", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime)))
            except OSError:
                await stream.write(struct.pack("<4sIII", b"STAT", 0, 0, 0))
        elif request in (b"STA2", b"LST2"):
            try:
                st = os.stat(device_path(root, path))
                await stream.write(STAT2.pack(request, 0, st.st_dev, st.st_ino, st.st_mode, st.st_nlink, st.st_uid,
                                              st.st_gid, st.st_size, int(st.st_atime), int(st.st_mtime), int(st.st_ctime)))
            except OSError as exc:
                await stream.write(STAT2.pack(request, exc.errno or errno.EIO, *[0] * 10))
        elif request == b"LIST":
            await list_dir(root, stream, path)
        elif request == b"SEND":
            if not await receive_file(root, stream, path):
                return
        elif request == b"RECV":
            if not await send_file(root, stream, path):
                return
        else:
            await fail(stream, f"unknown sync request {request!r}")
            return


async def list_dir(root: str, stream: Stream, path: str) -> None:
    """LIST path: a DENT per entry, then DONE (an unreadable folder lists empty, as with adbd)."""
    try:
        folder = device_path(root, path)
        names = sorted(os.listdir(folder))
    except OSError:
        names = []
    for name in names:
        try:
            st = os.lstat(os.path.join(folder, name))
        except OSError:
            continue
        raw = name.encode(errors="surrogateescape")
        await stream.write(DENT.pack(b"DENT", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime), len(raw)) + raw)
    await stream.write(DENT.pack(b"DONE", 0, 0, 0, 0))


async def receive_file(root: str, stream: Stream, spec: str) -> bool:
    """SEND "path,mode": DATA chunks into a temporary file, renamed over the target on DONE."""
    path, _, mode = spec.rpartition(",")
    tmp, out, error = "", None, None
    try:
        target = device_path(root, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.adbd-{os.getpid()}.tmp"
        out = open(tmp, "wb")
    except OSError as exc:
        error = f"cannot write {path}: {exc.strerror}"
    try:
        while True:
            kind, value = struct.unpack("<4sI", await stream.read_exact(8))
            if kind == b"DONE":  # value: the file's mtime
                break
            if kind != b"DATA":
                error = error or f"unexpected sync message {kind!r} while receiving {path}"
                break
            data = await stream.read_exact(value)
            if out and not error:
                out.write(data)
        if out and not error:
            out.close()
            os.chmod(tmp, int(mode) & 0o7777 if mode.isdigit() else 0o644)
            os.utime(tmp, (value, value))
            os.replace(tmp, target)
    except OSError as exc:
        error = f"cannot write {path}: {exc.strerror}"
    finally:
        if out:
            out.close()
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
    if error:
        await fail(stream, error)
        return False
    await stream.write(struct.pack("<4sI", b"OKAY", 0))
    return True


async def send_file(root: str, stream: Stream, path: str) -> bool:
    """RECV path: the file as DATA chunks and DONE, or FAIL saying why."""
    try:
        source = open(device_path(root, path), "rb")
    except OSError as exc:
        await fail(stream, f"open failed: {exc.strerror}")
        return False
    with source:
        while chunk := source.read(SYNC_CHUNK):
            await stream.write(struct.pack("<4sI", b"DATA", len(chunk)) + chunk)
    await stream.write(struct.pack("<4sI", b"DONE", 0))
    return True


# --- server ---------------------------------------------------------------------------------------
def _runs_in(group: int, root: str) -> bool:
    """Whether a process of process group `group` runs inside `root` (a group's id is handed out
    again only once none of its processes is left)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == group and os.readlink(f"/proc/{pid}/root") == os.path.realpath(root):
                return True
        except OSError:  # ended meanwhile
            continue
    return False


async def serve(root: str, host: str, port: int) -> None:
    """Accept adb connections until SIGTERM or SIGINT, then kill what every command started and left running."""
    server = await asyncio.start_server(lambda r, w: Connection(r, w, root).run(), host, port)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
    log.info("adbd for %s listening on %s:%d", root, host, port)
    await stopping.wait()
    server.close()
    for group in GROUPS:
        if _runs_in(group, root):  # else its id may be another process's by now
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    """python -m devices.adbd --rootfs ROOTFS [--port 5600] [--host 127.0.0.1]"""
    parser = argparse.ArgumentParser(prog="python -m devices.adbd", description=__doc__.splitlines()[0])
    parser.add_argument("--rootfs", required=True, help="root filesystem the commands run in (chroot)")
    parser.add_argument("--port", type=int, default=5600)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.rootfs):
        parser.error(f"--rootfs {args.rootfs} is not a folder")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    asyncio.run(serve(os.path.abspath(args.rootfs), args.host, args.port))


if __name__ == "__main__":
    main()
