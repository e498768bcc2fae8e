"""The data plane: agents, worker engines, models, sequence parallelism and KV transfer."""
