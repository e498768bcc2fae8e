"""The wire contract shared by the control plane, the agents and the SDK (generated code below)."""
