"""The embedding training methods by name, as the fronts offer them, with their release planners."""

from privdiff.embeddings.dpagg import plan_dpagg_ti, run_dpagg_ti
from privdiff.embeddings.dpsgd_ti import plan_dpsgd_ti, run_dpsgd_ti

METHODS = {"dpagg": run_dpagg_ti, "dpsgd": run_dpsgd_ti}
PLANS = {"dpagg": plan_dpagg_ti, "dpsgd": plan_dpsgd_ti}
