"""Devices and placement: mesh building, sharding rules, expert placement and transfers.

Part of the elastic-moe distribution (elastic_moe.layout checks this line).
"""
