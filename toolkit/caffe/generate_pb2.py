"""Regenerate ``caffe_pb2.py`` from ``caffe.proto``.

Usage (from the repository root, with the ``dev`` extra installed)::

    python -m toolkit.caffe.generate_pb2            # rewrites toolkit/caffe/caffe_pb2.py
    python -m toolkit.caffe.generate_pb2 --out DIR  # writes DIR/caffe_pb2.py instead

The compiler is the ``protoc`` bundled with ``grpcio-tools`` (pinned in
``requirements/constraints.txt``).  Its version decides the protobuf runtime
the generated module demands (the ``ValidateProtobufRuntimeVersion`` line):
it must not be newer than the pinned ``protobuf``, so bump the two together.

The generated module is committed, so installing or importing ``toolkit``
never needs ``grpcio-tools``; ``tests/caffe`` checks that the committed file
is what this script produces.

Raises ``RuntimeError`` when ``grpcio-tools`` is missing or protoc fails.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

PROTO_PATH = Path(__file__).resolve().with_name("caffe.proto")
# protoc is run from the directory that holds the ``toolkit`` package, so the
# file registers in protobuf's descriptor pool as "toolkit/caffe/caffe.proto"
# rather than a bare "caffe.proto" that another Caffe schema could also claim.
_INCLUDE_ROOT = PROTO_PATH.parents[2]
_PROTO_REL = PROTO_PATH.relative_to(_INCLUDE_ROOT)
_HEADER = (
    b"# flake8: noqa\n"
    b"# Written by toolkit/caffe/generate_pb2.py from caffe.proto; edit the .proto, not this file.\n"
)


def generate(out_dir: str | Path | None = None) -> Path:
    """Compile ``caffe.proto`` and write ``caffe_pb2.py`` into ``out_dir``.

    ``out_dir`` defaults to the folder of ``caffe.proto`` (overwriting the
    committed module).  Returns the path written.
    """
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise RuntimeError(
            "grpcio-tools is not installed; install the dev extra: "
            "pip install -c requirements/constraints.txt -e '.[dev]'"
        ) from exc

    out_dir = Path(out_dir) if out_dir is not None else PROTO_PATH.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        status = protoc.main(
            ["grpc_tools.protoc", f"-I{_INCLUDE_ROOT}", f"--python_out={tmp}", _PROTO_REL.as_posix()]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed on {PROTO_PATH} (exit status {status}); see its messages above")
        produced = Path(tmp) / _PROTO_REL.with_name("caffe_pb2.py")
        target = out_dir / "caffe_pb2.py"
        # The serialized descriptor is one very long line; keep linters off it.
        # (After protoc's first line, the coding declaration, which must stay there.)
        first, rest = produced.read_bytes().split(b"\n", 1)
        target.write_bytes(first + b"\n" + _HEADER + rest)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: beside caffe.proto)")
    args = parser.parse_args(argv)
    print(generate(args.out))


if __name__ == "__main__":
    main()
