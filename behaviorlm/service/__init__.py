"""The service layer: the online recommender over the inference engine, and the HTTP API (thin shells)."""
