"""The scheduling policy (pure) and the simulated cluster that stands in for Ray in tests and benchmarks."""
