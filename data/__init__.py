"""Tokenizer, MDS shards and the packing loader.

`python -m data.prepare` (text to a dataset), `make data` (data.default_corpus),
`data.loader.build_train_loader`, `data.validation.validation_windows`,
`data.tokenizer.load_tokenizer`; every data problem raises `data.manifest.DatasetError`.
"""
