"""The loop that feeds events to the policy, persists decisions and dispatches commands."""
