"""How the services talk: the tensor codec and the frames of the internal streams (with the shared-
memory logits ring), the gRPC servers and their interceptors, TLS, and sampler discovery."""
