"""The thin FastAPI control-plane API (BFF): authenticate, authorize, validate, read, start workflows."""
