"""The pure core: the model, the configuration, parsers of tool output, argv builders and
the planner. No I/O: nothing here runs a command or touches a file but config.load_config."""
