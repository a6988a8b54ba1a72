"""distca.parallel: process groups, dispatch layouts, all-to-all and ping-pong (design §5).

Imports torch and ``distca.scheduler``; never ``distca`` itself.
"""
