"""Sequence mixers and the layers around them. Importing this package registers every mixer."""
from longctx.layers import attention  # noqa: F401  (registers 'attention')
from longctx.layers import delta_net  # noqa: F401  (registers 'deltanet', 'gated_deltanet')
from longctx.layers import retention  # noqa: F401  (registers 'retnet', 'lightning')
from longctx.layers import gated_linear  # noqa: F401  (registers 'gla', 'hgrn2', 'hgrn')
from longctx.layers import mamba2  # noqa: F401  (registers 'mamba2')
from longctx.layers import titans  # noqa: F401  (registers 'titans')
from longctx.layers import titans_wirings  # noqa: F401  (registers 'titans_mag', 'titans_mac')
from longctx.layers import routing  # noqa: F401  (registers 'routing', 'local')
