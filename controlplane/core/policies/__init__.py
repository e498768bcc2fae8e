"""Scheduling policies, one file each, chosen by name through the registry."""
