"""The ways in: the offline :class:`LLM`, the :class:`AsyncEngine` that servers embed, the OpenAI-compatible HTTP
server and the ``diffuse-engine`` command line (``generate``, ``serve``, ``train``, ``eval``, ``sweep``, ...)."""
