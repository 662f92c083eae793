"""Regenerates the Python code of the wire contract into `client/expvault/v1/`.

Run from anywhere with the dev dependencies installed (pinned grpcio-tools and mypy-protobuf):

    python proto/generate.py            # writes client/expvault/v1/
    python proto/generate.py --out DIR  # writes DIR/expvault/v1/ (what the freshness test does)

The proto path mirrors the package (`proto/expvault/v1/vault.proto` -> `expvault.v1.vault_pb2`),
so the generated imports resolve as they are, without rewriting.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO = PROTO_ROOT.parent
DEFAULT_OUT = REPO / "client"
PACKAGE = Path("expvault") / "v1"
INIT = '"""Generated code of the expvault wire contract (proto/expvault/v1); never edit."""\n'


def _plugin(name: str) -> str:
    """Finds a protoc plugin installed next to this interpreter (venv `bin/`) or on PATH."""
    candidates = [Path(sys.executable).parent / name, Path(sysconfig.get_path("scripts")) / name]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install -e '.[dev]' (mypy-protobuf)")
    return found


def generate(out: Path) -> list[Path]:
    """Generates `vault_pb2.py/.pyi` and `vault_pb2_grpc.py/.pyi` under `out/expvault/v1/`.

    Args:
        out: the package root to write into (`client/` for the committed code).

    Returns:
        The files written.

    Raises:
        SystemExit: protoc failed or a plugin is missing.
    """
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    (out / PACKAGE / "__init__.py").write_text(INIT)
    return sorted(p for p in (out / PACKAGE).iterdir() if p.is_file())


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="package root to write")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
