"""Regenerates the committed Python stubs of `elastic_moe.proto` (run by `make proto`).

    python -m serve.proto.generate [--out DIR]

grpc_tools.protoc writes `elastic_moe_pb2.py`, `elastic_moe_pb2.pyi` and `elastic_moe_pb2_grpc.py`;
the gRPC module's import of the messages is then made package-relative
(`from serve.proto import elastic_moe_pb2`), so the stubs work from any working directory.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_NAME = "elastic_moe.proto"
PACKAGE = "serve.proto"
OUTPUTS = ("elastic_moe_pb2.py", "elastic_moe_pb2.pyi", "elastic_moe_pb2_grpc.py")


def protoc(args: list[str]) -> None:
    """Runs grpc_tools' bundled protoc with the well-known types on the include path."""
    from grpc_tools import protoc as _protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    code = _protoc.main(["grpc_tools.protoc", f"-I{well_known}", *args])
    if code != 0:
        raise RuntimeError(f"protoc failed (exit {code}): {' '.join(args)}")


def generate(out_dir: Path = PROTO_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Writes the three stub files into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    protoc(
        [
            f"-I{proto_dir}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto_dir / PROTO_NAME),
        ]
    )
    grpc_module = out_dir / "elastic_moe_pb2_grpc.py"
    text = grpc_module.read_text()
    fixed = re.sub(
        r"^import elastic_moe_pb2 as ",
        f"from {PACKAGE} import elastic_moe_pb2 as ",
        text,
        flags=re.MULTILINE,
    )
    if fixed == text:
        raise RuntimeError(f"{grpc_module}: found no `import elastic_moe_pb2` to fix")
    grpc_module.write_text(fixed)
    return [out_dir / name for name in OUTPUTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="output directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
