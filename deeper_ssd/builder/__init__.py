"""The builder half: NetSpec-style layer construction and the model zoo (see docs/architecture.md)."""
