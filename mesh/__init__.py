"""Devices and placement: mesh building, sharding rules, expert placement and transfers."""
