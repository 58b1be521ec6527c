"""Streamlit dashboards over the batch pipeline outputs (``make dashboard``)."""
