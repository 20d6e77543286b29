"""Sampling: the parameters (options), the reference sampler (reference) and the fast one (fast,
with fast_draw, penalty_history, top_p_candidates and argmax)."""
