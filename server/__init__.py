"""The ranking service: FastAPI app, Redis state store, request pipeline, metrics, and the kvrec CLI."""
