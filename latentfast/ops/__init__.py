"""The op layer: torch.library custom ops in the ``latentfast::`` namespace, their backend
dispatch, autograd formulas and fake kernels, one module per family."""
from latentfast.ops import flows  # noqa: F401  (registers the ops)
from latentfast.ops import geometry  # noqa: F401,E402  (registers the ops)
from latentfast.ops import rnn  # noqa: F401,E402  (registers the ops)
from latentfast.ops import dynamics  # noqa: F401,E402  (registers the ops)
