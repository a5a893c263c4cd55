"""The web app: server-rendered pages people use in the browser (PRD §4.1's BFF).

Everything about agents, VPSes, usage and plans goes through the control-plane API over HTTP
(`web/api_client.py`); the only tables read or written here are Auth.js's own (`web/auth.py`).
"""
