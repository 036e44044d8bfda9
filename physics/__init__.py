"""Cases, dose calculation, TPP-driven fluence optimisation, DVH and protocol scoring. Knows nothing of the bus."""
