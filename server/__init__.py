"""The gRPC side of yayi-serve: servicer, app wiring, CLI, metrics."""
