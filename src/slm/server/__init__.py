"""The HTTP API: FastAPI app (app.py), request schemas (schemas.py), settings (settings.py), and the
engine that batches concurrent requests onto the model (engine.py)."""
