"""The session protocol between a client and a host node, used by both sides.

``client`` holds the frames a client sends (and the node's parser for them), ``server``
the frames a node sends (and the client's parser), ``codes`` the error codes.
"""
