"""Entry points for `ray job submit`: one module per pipeline step.

Each runs on the cluster's head node as the job's driver, connects to the cluster through
RAY_ADDRESS (set by the job server), and takes the same flags as the matching `gensr`
subcommand. See docs/cluster.md.
"""
