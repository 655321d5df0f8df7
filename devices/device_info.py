"""What a device is: ABI, model, OS, cores and their max frequencies, governor, temperatures,
free memory, and whether it is emulated (so latency there means nothing)."""
from __future__ import annotations

from .transport import Transport

# one POSIX sh script that works on Android's toybox and on Linux; one `key value` per line. Sent as one
# line: over ssh a csh login shell reads the command first, and refuses a newline inside quotes
SCRIPT = "; ".join(r"""
echo "uname $(uname -srm)"
echo "abi $(getprop ro.product.cpu.abi 2>/dev/null)"
echo "model $(getprop ro.product.model 2>/dev/null)"
echo "android $(getprop ro.build.version.release 2>/dev/null)"
echo "qemu $(getprop ro.kernel.qemu 2>/dev/null)"
echo "bootqemu $(getprop ro.boot.qemu 2>/dev/null)"
for c in /sys/devices/system/cpu/cpu[0-9]*; do echo "cpu ${c##*cpu} $(cat $c/cpufreq/cpuinfo_max_freq 2>/dev/null)"; done
echo "nproc $(nproc 2>/dev/null || grep -c ^processor /proc/cpuinfo)"
echo "governor $(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null)"
echo "memfree $(grep MemAvailable /proc/meminfo 2>/dev/null)"
""".strip().splitlines())
TEMPS = r"""for z in /sys/class/thermal/thermal_zone*; do [ -r $z/temp ] && echo "$(cat $z/type 2>/dev/null) $(cat $z/temp)"; done; true"""
ABIS = {"aarch64": "arm64-v8a", "armv7l": "armeabi-v7a", "armv8l": "armeabi-v7a", "x86_64": "x86_64"}


def device_info(transport: Transport) -> dict:
    """Facts about the device, read through its shell."""
    facts: dict[str, str] = {}
    cores = []
    for line in transport.shell(SCRIPT, timeout=60).stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "cpu":
            cpu, _, khz = value.partition(" ")
            if cpu.isdigit():
                cores.append({"cpu": int(cpu), "max_khz": int(khz) if khz.strip().isdigit() else None})
        else:
            facts[key] = value.strip()
    if not cores:
        cores = [{"cpu": i, "max_khz": None} for i in range(int(facts.get("nproc") or 1))]
    cores.sort(key=lambda c: c["cpu"])
    uname = facts.get("uname", "")
    memfree = facts.get("memfree", "").split()
    return {
        "name": transport.name,
        "abi": facts.get("abi") or ABIS.get(uname.split()[-1] if uname else "", uname.split()[-1] if uname else "?"),
        "model": facts.get("model") or (uname.split()[0] if uname else "?"),
        "os": f"Android {facts['android']}" if facts.get("android") else uname.rsplit(" ", 1)[0],
        "cores": cores,
        "big_cores": big_cores(cores),
        "governor": facts.get("governor") or None,
        "mem_free_mb": int(memfree[1]) // 1024 if len(memfree) > 1 and memfree[1].isdigit() else None,
        "emulated": "1" in (facts.get("qemu"), facts.get("bootqemu")),  # newer emulator images set only ro.boot.qemu
        "temps": temperatures(transport),
    }


def big_cores(cores: list[dict], at_least: int = 1) -> list[int]:
    """The cores with the highest max frequency, taking the next tier down (a phone's middle cores)
    while they are fewer than `at_least` (all cores when frequencies are unknown)."""
    tiers = sorted({c["max_khz"] or 0 for c in cores}, reverse=True)
    chosen: list[int] = []
    for tier in tiers:
        chosen += [c["cpu"] for c in cores if (c["max_khz"] or 0) == tier]
        if len(chosen) >= at_least:
            break
    return sorted(chosen)


def cpu_mask(cpus: list[int]) -> str:
    """taskset's hex mask for a list of cores."""
    return format(sum(1 << c for c in cpus), "x")


def temperatures(transport: Transport) -> dict[str, float]:
    """Thermal zone name -> degrees Celsius (zones report millidegrees or degrees)."""
    temps = {}
    for line in transport.shell(TEMPS, timeout=30, check=False).stdout.splitlines():
        name, _, value = line.rpartition(" ")
        try:
            milli = int(value)
        except ValueError:
            continue
        base = name or "zone"
        key, n = base, 1
        while key in temps:
            n += 1
            key = f"{base}_{n}"
        temps[key] = milli / 1000 if abs(milli) > 200 else float(milli)
    return temps
