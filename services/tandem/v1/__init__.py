"""Protobuf and gRPC modules generated from protos/tandem/v1 by the build (never edited by hand)."""
