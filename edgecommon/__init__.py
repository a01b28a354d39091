"""Small pieces every windedge process shares: logging, sd_notify, durable writes.

Import rule: ``edgecommon`` imports no other first-party package, and every
first-party package may import it.
"""
