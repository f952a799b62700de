"""The embedding training methods by name, as the fronts offer them."""

from privdiff.embeddings.dpagg import run_dpagg_ti
from privdiff.embeddings.dpsgd_ti import run_dpsgd_ti

METHODS = {"dpagg": run_dpagg_ti, "dpsgd": run_dpsgd_ti}
