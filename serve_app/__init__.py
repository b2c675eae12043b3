"""The Serve application: typed settings, the wire protocol, the FastAPI ingress and the builder
that turns `serve_config.yaml` args into a deployment graph."""
