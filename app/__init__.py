"""The llama-chat application: session, history, configuration, command line and TUI."""
