"""The server side of yayi-serve: the gRPC servicer, the OpenAI-compatible HTTP front end, app wiring, CLI, metrics."""
