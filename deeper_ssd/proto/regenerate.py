"""Rebuild ``caffe_pb2.py`` from ``caffe.proto`` with grpcio-tools' bundled protoc.

    python -m deeper_ssd.proto.regenerate           # rewrite caffe_pb2.py
    python -m deeper_ssd.proto.regenerate --check   # exit 1 if the committed module is stale

grpcio-tools is a test dependency (``pip install -e .[test]``); the installed package
only needs the protobuf runtime.
"""
import argparse
import pathlib
import sys
import tempfile

PROTO_DIR = pathlib.Path(__file__).resolve().parent
GENERATED = PROTO_DIR / "caffe_pb2.py"


def generate() -> str:
    """Return the text protoc generates for caffe.proto (raises if protoc fails)."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}",
                          str(PROTO_DIR / "caffe.proto")])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR / 'caffe.proto'} (exit {rc})")
        return (pathlib.Path(out) / "caffe_pb2.py").read_text()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, do not write")
    args = parser.parse_args(argv)
    fresh = generate()
    if args.check:
        if GENERATED.read_text() != fresh:
            print(f"{GENERATED} is stale: run python -m deeper_ssd.proto.regenerate", file=sys.stderr)
            return 1
        print(f"{GENERATED} matches caffe.proto")
        return 0
    GENERATED.write_text(fresh)
    print(f"wrote {GENERATED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
