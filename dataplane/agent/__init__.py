"""Agent: attaches to the control plane and supervises one worker process per device."""
