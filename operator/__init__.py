"""inferfleet's Kubernetes operator: InferenceService -> workers, warm pool, pre-pull, balloons.

Import name `inferfleet.operator` (the folder is mapped in pyproject.toml: a top-level
`operator` would shadow the standard library). Nothing here imports torch.
"""
