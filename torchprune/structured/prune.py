from .channels import choose_removal, prune_channels  # noqa: F401  shim: removed at integration
from .granularity import prune_structural  # noqa: F401  shim: removed at integration
from .plan import PLAN_ATTRIBUTE  # noqa: F401  shim: removed at integration
from .select import select  # noqa: F401  shim: removed at integration
