"""One worker process per GPU (or CPU slot): an engine driven by commands from the agent."""
