"""Model pools (Ray Serve deployments over vLLM) and the builder of the Serve application."""
