"""Ray-orchestrated training: rank actors, run directory, metrics, checkpoints, restarts.

Importing this package does not import Ray or torch; ``distca train`` (distca/commands/train.py)
is the entry point and :class:`distca.train.driver.Trainer` the loop.
"""
