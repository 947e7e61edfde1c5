from .tracing.fx import Member, Tracer, trace, trace_fx  # noqa: F401  shim: removed at integration
