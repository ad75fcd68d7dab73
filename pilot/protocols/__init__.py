"""Thin Twisted protocols: decode, feed the logic, write what it asks."""
