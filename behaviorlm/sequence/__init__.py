"""The sequence layer: vocabularies, special tokens, time-gap buckets, encode/decode of event logs."""
