"""The faces of elastic-moe: gRPC server and client, metrics, the `elastic-moe` CLI.

Part of the elastic-moe distribution (elastic_moe.layout checks this line).
"""
