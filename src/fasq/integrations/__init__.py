"""transformers and vLLM integration."""
