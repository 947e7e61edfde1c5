from .plan import apply_plan, plan_from_removed, sync_attributes, zero_channels  # shim: removed at integration
