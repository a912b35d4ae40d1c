"""An engine run in a child process of the server, behind a socket (``--engine-process``).

Why: on a CPU the continuous-batching manager's loop is Python between the forward
passes, and in the server's process it takes turns at the GIL with the event loop, the
gRPC and HTTP front ends and the detokenizer.  vLLM V1 answers the same problem by running
its engine loop in a process of its own (``EngineCore`` behind ``AsyncLLM``); this is that
shape for an engine of ours.  It is a generic engine setting (``EngineConfig.engine_process``),
offered by the engines whose class declares ``runs_in_child_process``.

The parent keeps the request path of engines/base.py (checks, tokenization, admission,
token texts) and the child runs the engine's own part of the seam: ``check_params``,
``stream_tokens``, ``score_ids`` and ``prompt_logprobs`` of the same engine, built there by
the registry's own constructor.  What crosses is small and already a delta: the request
(token ids and sampling), each ``GenerationOutput`` (the tokens since the last one, with
their text), a cancel, and with every message the engine's load and health.  The child
sends what one turn of its event loop produced as one message.

- messages.py: the messages, typed (an enum of kinds, a dataclass each);
- proxy.py: the parent's side, the engine's own class with its seam relayed;
- child.py: the child's main (``python -m engines.process.child``).

A child that dies fails every request in flight as unavailable and turns the engine
unhealthy; a parent that dies closes the socket, and the child shuts its engine and exits.
"""
