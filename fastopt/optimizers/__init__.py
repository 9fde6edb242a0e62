"""fastopt's optimizers, one module each (see ``fastopt.registry``)."""
