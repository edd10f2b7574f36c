"""Tokenizer, MDS shards and the packing loader."""
