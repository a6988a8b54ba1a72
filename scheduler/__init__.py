"""distca.scheduler: documents -> CA-tasks -> attention servers (design §2, §4).

numpy only: this layer never imports torch, so it plans fast on any rank or laptop.
"""
