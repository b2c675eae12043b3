"""Plain classes behind the Ray Serve deployments (model loading, engines, history) and the thin
deployment shells around them. Everything except `*_deployment.py` runs without Ray."""
