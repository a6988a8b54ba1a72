"""Predicted peak memory of a recipe's largest rank (``distca memory``), and the fit check that
``distca train`` runs before Ray starts. :mod:`distca.memory.estimate` has the model."""
