"""One router per resource: generation, heads, and operations (health, readiness, metrics)."""
