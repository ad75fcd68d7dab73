"""
The ``pilot:`` endpoint strings (``docs/api.md``), as txtorcon's plugin does:
``clientFromString(reactor, "pilot:agent-b:1000")`` and
``serverFromString(reactor, "pilot:1000")``.  The parsers live in
:mod:`pilot.endpoints`; this module only makes them visible to Twisted.
"""

from pilot.endpoints import ClientParser, ServerParser

pilotClientParser = ClientParser()
pilotServerParser = ServerParser()
