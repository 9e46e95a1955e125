"""Model-to-model verbs applied to a built model (``verb_(model, cfg, filter)``): task pruning, EWA merge,
EvoMoE spawn, and the converters."""
