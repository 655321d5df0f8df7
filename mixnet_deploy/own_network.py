"""The user's own network: FILE.py:FACTORY or MODULE:FACTORY, a function that returns the model,
imported with the code it was built from recorded (each file's SHA-256), so a rebuild can refuse
code edited since."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path

from torch import nn

from .digests import file_sha256
from .errors import MixdeployError

# FILE.py:FACTORY (split at the last colon: a folder may have one) or MODULE:FACTORY
OWN = re.compile(r"(?P<source>.+\.py|[A-Za-z_][\w.]*):(?P<factory>[A-Za-z_]\w*)")
_MIXDEPLOY = Path(__file__).resolve().parents[1]  # mixdeploy's own packages live here
_CODE: dict[str, set[str]] = {}  # folder -> files its imports loaded (a module is imported once per process)


def own_network(name: str) -> tuple[str, str] | None:
    """(source, factory) of the user's own network, else None."""
    match = OWN.fullmatch(name)
    return (match["source"], match["factory"]) if match else None


def _folder(source: str) -> Path:
    """Where the code lives: the file's folder, or the current folder a MODULE is imported from."""
    return Path(source).resolve().parent if source.endswith(".py") else Path.cwd()


def check_source(source: str) -> None:
    """A usage error, before any work, when FILE.py does not exist or MODULE cannot be found."""
    if source.endswith(".py"):
        if not Path(source).is_file():
            raise MixdeployError(f"{source} does not exist; FILE.py:FACTORY names a Python file and the function in "
                                 "it that returns your model")
        return
    _importable(_folder(source))
    try:
        found = importlib.util.find_spec(source)
    except (ImportError, ValueError) as exc:
        raise MixdeployError(f"importing {source} failed: {type(exc).__name__}: {exc}") from None
    if found is None:
        raise MixdeployError(f"no module {source} here; MODULE:FACTORY imports MODULE from the current folder or "
                             "the installed packages (or give FILE.py:FACTORY)")


def _importable(folder: Path) -> None:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # its sibling modules, as `python FILE.py` would find them


def _import(source: str):
    """The module of FILE.py (under a name of its own path) or MODULE, its errors one line."""
    _importable(_folder(source))
    try:
        if not source.endswith(".py"):
            return importlib.import_module(source)
        path = Path(source).resolve()
        name = f"mixdeploy_own_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(name, path)
        code = importlib.util.module_from_spec(spec)
        sys.modules[name] = code  # dataclasses, pickling and type hints look a class's module up there
        try:
            spec.loader.exec_module(code)
        except BaseException:
            del sys.modules[name]
            raise
        return code
    except Exception as exc:  # the user's code: any error
        raise MixdeployError(f"importing {source} failed: {type(exc).__name__}: {exc}") from None


def build(source: str, factory: str) -> tuple[nn.Module, dict[str, str]]:
    """FACTORY() of SOURCE, and the files of its folder the import loaded -> their SHA-256."""
    folder = _folder(source)
    before = set(sys.modules)
    code = _import(source)
    where = Path(getattr(code, "__file__", "") or "").resolve()
    if where.is_relative_to(_MIXDEPLOY) and not folder.is_relative_to(_MIXDEPLOY):
        raise MixdeployError(f"{source} is one of mixdeploy's own modules; rename yours or give FILE.py:FACTORY")
    loaded = {str(Path(m.__file__).resolve()) for n in set(sys.modules) - before
              if (m := sys.modules[n]) is not None and getattr(m, "__file__", None)}
    files = _CODE.setdefault(str(folder), set())
    files |= {f for f in loaded | {str(where)} if Path(f).is_relative_to(folder) and Path(f).suffix == ".py"}
    made = getattr(code, factory, None)
    if not callable(made):
        raise MixdeployError(f"{source} has no function {factory}; give FILE.py:FACTORY with a function that returns "
                             "your model")
    try:
        model = made()
    except Exception as exc:
        raise MixdeployError(f"{source}:{factory}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise MixdeployError(f"{source}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model, {f: file_sha256(f) for f in sorted(files)}


def check_unchanged(files: dict[str, str]) -> None:
    """Before a rebuild: every recorded code file still there with its SHA-256."""
    for path, digest in files.items():
        if not Path(path).is_file():
            raise MixdeployError(f"the export was made from {path}, which is gone; export the model again")
        if file_sha256(path) != digest:
            raise MixdeployError(f"{path} has changed since the export was made from it (its SHA-256 differs); "
                                 "export the model again")
