"""Client programs the framework tests run as processes, each with the interpreter it is given."""
