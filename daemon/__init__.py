"""npuserve daemon: HTTP app, scheduler, config and CLI."""
