"""Helpers for testing distributed jobs: emulated hosts on one machine (:mod:`plait.testing.hosts`)."""
