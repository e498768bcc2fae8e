"""The `pecsched` command: the composition root that gathers every component's subcommands."""
