from .plan import apply_plan, plan_from_removed, zero_channels  # noqa: F401 shim: removed at integration
