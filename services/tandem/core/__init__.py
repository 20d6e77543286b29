"""Code shared by the Tandem services: the model (core.modeling), the wire (core.wire), sampling,
the tokenizer, configuration, cores, metrics, tracing and errors."""
