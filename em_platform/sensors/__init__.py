"""Sensors: they watch the world and request runs."""
