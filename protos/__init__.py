"""Ferry protobuf/gRPC definitions (KServe v2 + Triton extensions) and generated code."""
