"""Configuration and operations: the config tree, the local launcher, the operators' CLI."""
