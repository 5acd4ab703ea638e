"""The GlimpRouter router: routing policies, the step loop, request state in Redis, the OpenAI API."""
