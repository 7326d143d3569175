"""Registers the node test fixtures (defined in node_support, which tests import by name)."""

from node_support import scripted, start_node  # noqa: F401
