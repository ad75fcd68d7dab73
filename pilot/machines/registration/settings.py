# -*- test-case-name: tests.machines.test_registration -*-
"""
The node's registry settings (hostname, visibility, tags) and which of
their changes the registry has not confirmed yet (``docs/registration.md``,
"Settings").  Plain bookkeeping: the registry session decides when to send.
"""

from __future__ import annotations

from typing import Any, Optional

import attr

from pilot.machines.registration.values import Reply


@attr.s(auto_attribs=True, eq=False)
class Settings:
    hostname: Optional[str]
    public: bool
    tags: list[str]
    #: setting name -> why the registry refused its latest request
    errors: dict[str, str] = attr.Factory(dict)
    #: setting name -> serial of its latest change the registry has not confirmed
    changes: dict[str, int] = attr.Factory(dict)
    serial: int = 0
    #: setting name -> serial sent by the current registration's settings step
    step_sent: dict[str, int] = attr.Factory(dict)

    def remember(self, name: str, value: Any) -> None:
        """The owner changed ``name``: keep it until the registry confirms it."""
        setattr(self, name, value)
        self.serial += 1
        self.changes[name] = self.serial

    def confirmed(self, name: str, serial: Optional[int]) -> None:
        """The registry applied ``name`` as it was at ``serial`` (None: whatever it is)."""
        self.errors.pop(name, None)
        if serial is not None and self.changes.get(name) == serial:
            del self.changes[name]

    def message(self, name: str, node_id: int) -> dict[str, Any]:
        """The (unsigned) request that sets ``name``."""
        if name == "public":
            return {"type": "set_visibility", "node_id": node_id, "public": self.public}
        if name == "tags":
            return {"type": "set_tags", "node_id": node_id, "tags": list(self.tags)}
        return {"type": "set_hostname", "node_id": node_id, "hostname": self.hostname or ""}

    def after_register(self, reply: Reply) -> list[str]:
        """The settings a fresh registration must send, given its register_ok."""
        names = []
        if self.public or "public" in self.changes:
            names.append("public")
        if self.tags or "tags" in self.changes:
            names.append("tags")
        if self.hostname is not None:
            have = reply.get("hostname")
            have = have if isinstance(have, str) else ""
            if have != self.hostname:
                names.append("hostname")
            else:
                self.confirmed("hostname", self.changes.get("hostname"))
        return names

    def changed_since_step(self) -> list[str]:
        """Settings changed after this registration's settings step sent them."""
        return [name for name, serial in sorted(self.changes.items()) if self.step_sent.get(name) != serial]
