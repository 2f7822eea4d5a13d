"""Choosing every unit's option jointly: the allocation algorithms, the ranks file, the sensitivities, the
validated search, and the objective's latency restriction."""
