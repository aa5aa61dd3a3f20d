"""Re-export of the error classes (defined in `ir`, the lowest layer)."""
from tensorfold.ir.errors import *  # noqa: F401,F403
from tensorfold.ir.errors import TensorfoldError  # noqa: F401
