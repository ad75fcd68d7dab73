"""
The services every node offers its trusted peers on well-known ports, as
sans-I/O cores (``docs/apps.md``): data exchange on port 1001
(:mod:`pilot.apps.exchange`, storage in :mod:`pilot.apps.storage`) and the
event broker on port 1002 (:mod:`pilot.apps.broker`).  Their Twisted
protocols are in :mod:`pilot.protocols.apps`.
"""
