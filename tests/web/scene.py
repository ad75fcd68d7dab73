"""
A rendezvous' registry and beacon on a clock, with nodes registered from
distinct documentation addresses (nothing is sent), for the web tests.
"""

from __future__ import annotations

from pilot.identity import Identity
from pilot.wire.beacon import Relay
from tests.server.test_beacon import World


def ident(n: int) -> Identity:
    return Identity.from_seed(n.to_bytes(4, "big") * 8)


class Fleet(World):
    """``World`` with numbered nodes: node ``n`` talks from 198.51.100.x or 203.0.113.x."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[int, int] = {}
        self.addrs: dict[int, tuple[str, int]] = {}
        self.identities: dict[int, Identity] = {}

    def add(self, n: int, public: bool = False, tags: tuple[str, ...] = (), hostname: str = "") -> int:
        who = ident(n)
        addr = (f"198.51.{100 + n // 250}.{n % 250 + 1}" if n % 2 else f"203.0.{113 + n // 250}.{n % 250 + 1}",
                20000 + n)
        node_id = self.register(who, addr)
        self.ids[n], self.addrs[n], self.identities[n] = node_id, addr, who
        if public:
            self.request(who, {"type": "set_visibility", "node_id": node_id, "public": True})
        if tags:
            self.request(who, {"type": "set_tags", "node_id": node_id, "tags": list(tags)})
        if hostname:
            self.request(who, {"type": "set_hostname", "node_id": node_id, "hostname": hostname})
        self.discover(node_id, addr)
        return node_id

    def node_address(self, n: int) -> object:
        return self.registry.state.nodes[self.ids[n]].address

    def relay(self, a: int, b: int, size: int) -> int:
        """Relay ``size`` bytes from node ``a`` to node ``b`` (trusting each other); datagrams delivered."""
        ia, ib = self.identities[a], self.identities[b]
        if not self.registry.trusts(self.ids[a], self.ids[b]):
            self.trust(ia, self.ids[a], self.ids[b])
            self.trust(ib, self.ids[b], self.ids[a])
        return len(self.send(Relay(self.ids[a], self.ids[b], b"f" * size).encode(), self.addrs[a]))
