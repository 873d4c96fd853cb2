"""The worker's OpenAI-compatible server: :mod:`.protocol` (request validation and response
bodies, pure), :mod:`.sse` (event framing), :mod:`.serving` (one request against the engine;
the batch runner calls :func:`.serving.complete`), :mod:`.app` (Starlette routes, uvicorn,
draining on SIGTERM). Nothing here imports torch."""
