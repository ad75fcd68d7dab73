"""
twistd plugins for pilot (``twistd --help`` lists them).

This folder has no ``__init__.py`` on purpose: ``twisted.plugins`` is
Twisted's namespace for plugins, and each plugin module is imported lazily by
name; the heavy imports happen in ``pilot.tap`` / ``pilot.nodetap`` only when the plugin runs.
"""

from twisted.application.service import ServiceMaker

pilot_rendezvous = ServiceMaker(
    "pilot-rendezvous",
    "pilot.tap",
    "Pilot rendezvous: registry (TCP) and beacon (UDP)",
    "pilot-rendezvous",
)

pilot_node = ServiceMaker(
    "pilot-node",
    "pilot.nodetap",
    "Pilot node daemon: registration, encrypted tunnels, trust, the control socket",
    "pilot-node",
)

# The `pilot:` endpoint string parsers are in pilot_endpoints.py.
