"""surgeond: the on-device test-time adaptation service (built in the daemon issue)."""
