"""Side-by-side benchmarks: bare vLLM, this stack, and Ray Serve LLM on the same model."""
