"""The OpenAI-compatible HTTP gateway: /v1/completions, /v1/chat/completions, /v1/models, /health.

A thin ASGI app (Starlette, served by uvicorn) that reaches the coordinator only through the async
client SDK: `protocol` maps OpenAI request bodies to generate options and results back, `chat`
renders chat templates, `app` holds the routes, `streams` merges a request's Generate calls and
watches for the client leaving, `answers` writes the whole body or the server-sent events,
`server` runs them (`tandem serve gateway`).
"""
