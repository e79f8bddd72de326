"""Python stubs generated from ``protos/`` (do not edit them; run ``make protos``).

The .proto files are compiled under the virtual include path ``common/proto_gen`` so that the
generated gRPC module imports its messages as ``common.proto_gen.privtune.v1.inference_pb2``, an
import that works from the installed package without touching ``sys.path``.
"""
