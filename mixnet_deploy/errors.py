"""The one error type users see (a clear line, exit code 2) and the checks of user input that raise it."""
import math


class MixdeployError(Exception):
    """Bad input or an unusable environment; the message says what is wrong and what to do."""

    exit_code = 2


def reject_options(given: list[str], goes_with: str) -> None:
    """Raise MixdeployError when options were `given` that only go with `goes_with`."""
    if given:
        raise MixdeployError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with {goes_with}")


def is_number(value: object) -> bool:
    """A finite int or float, as user input (a JSON file, a checkpoint) means one: true, false and NaN are not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class DeviceError(MixdeployError):
    """A device that cannot be reached or that fails mid-run (adb missing, offline, timeout): exit code 1."""

    exit_code = 1


class DeviceTimeout(DeviceError):
    """A device command that did not finish in its time limit (`seconds`)."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds
