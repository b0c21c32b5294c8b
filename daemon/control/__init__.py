"""The ZMQ control plane: protocol, server, one module per command, client, surgeonctl."""
