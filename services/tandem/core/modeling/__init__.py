"""The model as the stages run it: configuration and weights, decoder layers and their projections,
paged KV cache and attention, CUDA graphs, and what a stage costs (profiles and the layer split)."""
