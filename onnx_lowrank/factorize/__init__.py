"""Turning one unit's weight into factors: the contracts, the shared linear algebra, each decomposition in a
module of its own, coupled units (pruned pairs, attention heads), a unit's menu of options, the rewrite of
an allocation and the refit of its factors."""
