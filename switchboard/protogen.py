"""Generate the Python code for every ``.proto`` in ``protos/``.

Run from the repository root::

    python -m switchboard.protogen            # writes into the repository
    python -m switchboard.protogen --out DIR  # writes into DIR (the drift test uses this)

It runs ``protoc`` from the pinned ``grpcio-tools`` wheel with the
``mypy-protobuf`` plugins, so the output depends only on the versions pinned in
``pyproject.toml``. Messages land in ``<out>/switchboard/<pkg>/v1/*_pb2.py``
(+ ``.pyi``), services in ``*_pb2_grpc.py`` (+ ``.pyi``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
THIRD_PARTY_ROOT = REPO_ROOT / "third_party" / "googleapis"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Return every ``.proto`` file under ``proto_root``, sorted, relative to it."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Generate Python modules, gRPC stubs and type stubs into ``out_dir``.

    Returns the generated files (relative to ``out_dir``). Raises
    ``RuntimeError`` if protoc fails or a plugin is missing.
    """
    from grpc_tools import protoc

    plugin_dir = Path(sys.executable).parent
    mypy_plugin = shutil.which("protoc-gen-mypy", path=str(plugin_dir)) or shutil.which("protoc-gen-mypy")
    mypy_grpc_plugin = shutil.which("protoc-gen-mypy_grpc", path=str(plugin_dir)) or shutil.which(
        "protoc-gen-mypy_grpc"
    )
    if mypy_plugin is None or mypy_grpc_plugin is None:
        raise RuntimeError("mypy-protobuf is not installed (pip install -e '.[dev]')")
    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{THIRD_PARTY_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={mypy_plugin}",
        f"--plugin=protoc-gen-mypy_grpc={mypy_grpc_plugin}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; see its messages above")
    generated: list[Path] = []
    for proto in proto_files():
        package_dir = out_dir / proto.parent
        # Make every generated folder an importable package.
        for parent in [proto.parent, *proto.parent.parents]:
            if str(parent) == ".":
                continue
            init = out_dir / parent / "__init__.py"
            if not init.exists():
                init.write_text("")
        stem = proto.stem
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            path = package_dir / f"{stem}{suffix}"
            if path.exists():
                generated.append(path.relative_to(out_dir))
    return generated


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
