"""The user's own network: FILE.py:FACTORY or MODULE:FACTORY, a function that returns the model,
imported with the code it was built from recorded (each file's SHA-256), so a rebuild can refuse
code edited since."""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import re
import sys
import sysconfig
from pathlib import Path

from torch import nn

from .digests import file_sha256
from .errors import MixdeployError

# FILE.py:FACTORY (split at the last colon: a folder may have one) or MODULE:FACTORY
OWN = re.compile(r"(?P<source>.+\.py|[A-Za-z_][\w.]*):(?P<factory>[A-Za-z_]\w*)")
_MIXDEPLOY = Path(__file__).resolve().parents[1]
OWN_PACKAGES = ("cli", "mixnet_deploy", "exporters", "quantization", "devices")  # mixdeploy's, in _MIXDEPLOY


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
        _check_siblings(Path(source))
        return
    if source.split(".")[0] in OWN_PACKAGES:
        raise MixdeployError(f"{source} is one of mixdeploy's own modules; rename yours or give FILE.py:FACTORY")
    _importable(_folder(source))
    try:
        found = importlib.util.find_spec(source)  # imports its parent packages
    except Exception as exc:  # the user's code: any error
        raise MixdeployError(f"importing {source} failed: {type(exc).__name__}: {exc}") from None
    if found is None:
        raise MixdeployError(f"no module {source} here; MODULE:FACTORY imports MODULE from the current folder or "
                             "the installed packages (or give FILE.py:FACTORY)")


def _check_siblings(path: Path) -> None:
    """A sibling module FILE.py imports under the name of one of mixdeploy's own (devices, cli ...)
    would silently be mixdeploy's, already loaded: a usage error naming it."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return  # said when it is imported
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    folder = path.resolve().parent
    for name in sorted(imported & set(OWN_PACKAGES)):
        if folder != _MIXDEPLOY and ((folder / f"{name}.py").exists() or (folder / name).is_dir()):
            raise MixdeployError(f"{path} imports its sibling {name}, which has the name of one of mixdeploy's own "
                                 "modules (mixdeploy's would be used); rename it")


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
    except SystemExit:  # argparse, or sys.exit(), run on import
        raise MixdeployError(f"importing {source} exits (sys.exit or argparse run on import); put that code under "
                             "`if __name__ == \"__main__\":`") from None
    except Exception as exc:  # the user's code: any error
        raise MixdeployError(f"importing {source} failed: {type(exc).__name__}: {exc}") from None


def build(source: str, factory: str) -> tuple[nn.Module, dict[str, str]]:
    """FACTORY() of SOURCE, and the code it was built from: the Python files of its folder loaded
    once FACTORY has run -> their SHA-256."""
    code = _import(source)
    made = getattr(code, factory, None)
    if not callable(made):
        raise MixdeployError(f"{source} has no function {factory}; give FILE.py:FACTORY with a function that returns "
                             "your model")
    try:
        model = made()
    except (Exception, SystemExit) as exc:  # the user's code: any error, an argparse exit too
        raise MixdeployError(f"{source}:{factory}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise MixdeployError(f"{source}:{factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model, {f: file_sha256(f) for f in _code_files(_folder(source))}


def _code_files(folder: Path) -> list[str]:
    """The loaded modules' files under `folder`, but for installed packages and mixdeploy's own
    (a project's .venv, a run from mixdeploy's repository)."""
    paths = sysconfig.get_paths()
    outside = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix, paths["purelib"], paths["platlib"],
                                           paths["stdlib"])] + [_MIXDEPLOY / p for p in OWN_PACKAGES]
    named = [Path(f) for m in list(sys.modules.values()) if isinstance(f := getattr(m, "__file__", None), str)]
    files = {f.resolve() for f in named if f.is_absolute() and f.is_file()}  # some native modules name no real file
    return sorted(str(f) for f in files if f.suffix == ".py" and f.is_relative_to(folder)
                  and f != _MIXDEPLOY / "cli.py" and not any(f.is_relative_to(o) for o in outside))


def check_unchanged(files: dict[str, str]) -> None:
    """Before a rebuild: every recorded code file still there with its SHA-256."""
    for path, digest in files.items():
        if not Path(path).is_file():
            raise MixdeployError(f"the export was made from {path}, which is gone; export the model again")
        if file_sha256(path) != digest:
            raise MixdeployError(f"{path} has changed since the export was made from it (its SHA-256 differs); "
                                 "export the model again")


def check_rebuilt(recorded: dict[str, str], rebuilt: dict[str, str], name: str) -> None:
    """After a rebuild: the code loaded includes the code recorded (a module of the same name from
    elsewhere, cached or found first, would have built another network)."""
    other = [path for path, digest in recorded.items() if rebuilt.get(path) != digest]
    if other:
        raise MixdeployError(f"rebuilding {name} did not load {other[0]} (a module of the same name came from "
                             "elsewhere); run it from the folder it was exported from, in a process of its own")
