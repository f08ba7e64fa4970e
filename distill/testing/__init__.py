"""Helpers for testing a pipeline without a real teacher: `fault_server` is an OpenAI-compatible
server on loopback that answers deterministically and injects faults on purpose."""
