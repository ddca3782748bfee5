"""Stages: one module per `qtool` subcommand that writes or reads a stage directory."""
