"""
The NAT lab: real rendezvous and node processes in Linux network namespaces
behind iptables NAT routers (``topology.py`` builds them, ``nodes.py`` runs
the programs).  Needs root, ``ip`` and ``iptables`` (``conntrack`` for some
evidence); without them every test skips, naming what is missing
(``NATLAB_REQUIRE=1`` makes that a failure).  Run it with
``python3 -m twisted.trial tests.natlab``; results: ``docs/nat.md``,
"NAT lab matrix".
"""
