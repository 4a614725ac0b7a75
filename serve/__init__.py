"""The faces of elastic-moe: gRPC server and client, metrics, the `elastic-moe` CLI."""
