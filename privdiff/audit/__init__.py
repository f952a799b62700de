"""Privacy auditing: an empirical lower bound on a release's ε from one run with canaries.

``privdiff.audit.bound`` turns an attacker's guesses (or scores) into the bound and works for any mechanism;
the rest of the package runs privdiff's own releases with canaries and scores them.
"""

from privdiff.audit.bound import AuditBound, best_lower_bound, epsilon_lower_bound, guesses, lower_bound_at, p_value

__all__ = ["AuditBound", "best_lower_bound", "epsilon_lower_bound", "guesses", "lower_bound_at", "p_value"]
