"""Build hook: generate the protobuf and gRPC modules from protos/ before packaging.

`pip install .` from a clean clone therefore ships working `tandem.v1` modules;
the generated files are build outputs and never edited or committed.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def generate_protos() -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject build-system)
    import grpc_tools

    proto_root = ROOT / "protos"
    include = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={ROOT / 'services'}",
        f"--pyi_out={ROOT / 'services'}",
        f"--grpc_python_out={ROOT / 'services'}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
