"""Production jobs over the behaviorlm library; each module is one step with its own entry point."""
