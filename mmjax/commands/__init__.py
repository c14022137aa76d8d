"""The `mmjax` subcommands whose code is command-line only (argument parsing, exit codes)."""
