"""``apet-serve``: an OpenAI-compatible HTTP server over a built artifact.

People deploying a VLM on a Jetson or a desktop GPU talk to it from a robot, an agent or a UI in the
shape every client already speaks: OpenAI's chat completions with image parts. The modules, one job each:

* :mod:`~apet.serve.config`    -- the server's limits and knobs (:class:`ServeConfig`), validated once;
* :mod:`~apet.serve.protocol`  -- the OpenAI request body -> a validated :class:`ChatRequest`;
* :mod:`~apet.serve.media`     -- data URLs (and, with ``--allow-fetch``, http(s) URLs) -> images / videos;
* :mod:`~apet.serve.scheduler` -- the bounded queue and the worker that micro-batches requests into
  ``Pipeline.generate_batch`` (per-row configs, per-row cancellation);
* :mod:`~apet.serve.responses` -- completion / chunk / error bodies, ``usage`` and the ``apet`` extension;
* :mod:`~apet.serve.stream`    -- server-sent events, holding back text that may start a stop string;
* :mod:`~apet.serve.metrics`   -- Prometheus metrics in a registry per app;
* :mod:`~apet.serve.app`       -- the Starlette routes; :mod:`~apet.serve.server` -- uvicorn, in the
  foreground (the CLI) or on a background thread (tests, embedding).

The HTTP stack is Starlette + uvicorn (``pip install "apet[serve]"``): both maintained by the Encode
team, small (Starlette depends only on anyio; uvicorn's plain install only on h11 and click — no
compiled extensions, so they install on Jetson's aarch64 Python as they do on a desktop), and
Starlette's ``StreamingResponse`` is all server-sent events need. FastAPI would add pydantic and its
own 422 error shape for no gain here: validation must answer in OpenAI's error shape with messages
that name the limit and the fix, which :mod:`~apet.serve.protocol` does by hand.
"""

from apet.serve.config import ServeConfig

__all__ = ["ServeConfig"]
