"""Wire codecs: bytes <-> values, no I/O, no reactor, no logging."""
