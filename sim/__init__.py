"""Discrete-event simulator driving the unchanged controlplane.core policies."""
