"""The OpenAI-compatible HTTP front end (the ``serve`` extra) over the engine (:mod:`griffon.engine`):
the API's request and answer models and the completions and chat endpoints (:mod:`.server`,
:mod:`.chat`)."""
