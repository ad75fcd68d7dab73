# -*- test-case-name: tests.node.test_core -*-
"""
The node, sans I/O (docs/architecture.md): :class:`Node` builds and wires
its parts; :class:`PeerDirectory` knows the other nodes.
"""

from pilot.node.core import Node
from pilot.node.peers import Peer, PeerDirectory

__all__ = ["Node", "Peer", "PeerDirectory"]
