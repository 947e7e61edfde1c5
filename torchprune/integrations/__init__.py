"""Glue to other libraries' training loops; each module imports its library, so import it by name
(``from torchprune.integrations.transformers import PrunerCallback``): ``import torchprune`` never
needs them."""
