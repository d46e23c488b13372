"""The committed protobuf code is what scripts/gen_proto.py makes from proto/, and the seed's
proto is the seed's, byte for byte."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

SEED_PROTO = """syntax = "proto3";
service MessageSync {
  rpc SubmitMessage (SubmitRequest) returns (SubmitReply) {}
  rpc PushMessageStream (ConnRequest) returns (stream MessageReply) {}
}
message SubmitRequest { string channel = 1; string message = 2; }
message SubmitReply   { string reply = 1; }
message ConnRequest   { string channel = 1; }
message MessageReply  { string message = 1; }
"""


def test_generated_code_is_fresh() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_seed_proto_is_verbatim() -> None:
    assert (ROOT / "proto" / "push.proto").read_text() == SEED_PROTO


def test_seed_descriptor_has_no_package() -> None:
    from pushchannel._proto import push_pb2

    assert push_pb2.DESCRIPTOR.package == ""
    assert set(push_pb2.DESCRIPTOR.services_by_name) == {"MessageSync"}
