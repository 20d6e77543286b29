"""Code shared by every Tandem service: model, tensor codec, tokenizer, configuration, errors."""
