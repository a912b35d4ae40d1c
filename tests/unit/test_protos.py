"""The committed generated code matches protos/: regenerate with `make protos` when this fails."""

from pathlib import Path

from server import codegen


def test_generated_code_matches_proto(tmp_path):
    fresh = codegen.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = codegen.DEFAULT_OUT / relative
        assert committed.is_file(), f"{relative} is missing: run `make protos`"
        assert committed.read_text() == path.read_text(), f"{relative} drifted from the .proto: run `make protos`"


def test_contract_field_names():
    from server.grpc.wire import pb

    fields = {
        m: {f.name for f in getattr(pb, m).DESCRIPTOR.fields}
        for m in ["GenerateRequest", "SamplingParams", "GenerateResponse", "GenerateChunk", "Usage"]
    }
    assert {"request_id", "prompt", "params"} <= fields["GenerateRequest"]
    assert {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "stop",
        "seed",
        "ignore_eos",
    } <= fields["SamplingParams"]
    assert {"text", "token_ids", "finish_reason", "usage", "ttft_ms", "e2e_ms"} <= fields["GenerateResponse"]
    assert {"text", "token_ids", "finish_reason", "usage"} <= fields["GenerateChunk"]
    assert pb.DESCRIPTOR.package == "yayi.serving.v1"
    assert Path(pb.DESCRIPTOR.name) == Path("yayi/serving/v1/inference.proto")
