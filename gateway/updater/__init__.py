"""Connector updates: signed manifests, the updater process beside each connector, its commands."""
