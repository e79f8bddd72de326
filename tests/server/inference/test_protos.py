"""The committed stubs match the .proto, and the API has no way to return a distribution."""

from __future__ import annotations

from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from privtune.common.proto_gen.generate import STUBS, generate
from privtune.common.proto_gen.privtune.v1 import inference_pb2 as pb


def test_committed_stubs_are_up_to_date(tmp_path):
    for fresh in generate(tmp_path):
        committed = STUBS / fresh.relative_to(tmp_path)
        assert committed.read_bytes() == fresh.read_bytes(), f"{committed} is stale: run 'make protos'"
    assert (STUBS / "privtune" / "v1" / "inference_pb2_grpc.py").exists()


def test_the_api_never_carries_a_distribution():
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    assert {m.name for m in service.methods} == {"NextToken", "Generate", "BudgetStatus", "Health"}
    token = service.methods_by_name["NextToken"].output_type
    assert service.methods_by_name["Generate"].output_type is token
    assert {f.name: f.type for f in token.fields} == {
        "id": FieldDescriptor.TYPE_UINT32,
        "text": FieldDescriptor.TYPE_STRING,
        "queries_remaining": FieldDescriptor.TYPE_UINT64,
    }
    # No message holds a repeated number (probabilities, logits, the subset) or bytes (a packed tensor).
    floats = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            assert field.type != FieldDescriptor.TYPE_BYTES, (message.name, field.name)
            if field.label == FieldDescriptor.LABEL_REPEATED:
                assert (message.name, field.name) == ("TokenIds", "ids"), "only a prompt may be a list"
            if field.type in floats:
                assert message.name == "BudgetStatusResponse", (message.name, field.name)
    assert pb.DESCRIPTOR.package == "privtune.v1"
    assert Path(pb.__file__).parent == STUBS / "privtune" / "v1"
