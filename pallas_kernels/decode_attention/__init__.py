"""Decode attention over a compacted KV cache: a few query tokens per row against per-head slot
counts and positions (GQA, split over the slot axis). ``api.decode_attention`` dispatches."""
