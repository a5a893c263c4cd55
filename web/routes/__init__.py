"""The web app's pages, one router per area; `web/app.py` includes them all."""
