"""The gRPC contract (elastic_moe.v1) and its generated Python stubs."""
