"""The bottom layer: shared types (RoutingDecision, DispatchPlan), typed configs, the registry, errors."""
