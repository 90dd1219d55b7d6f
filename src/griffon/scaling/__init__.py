"""Scaling studies: sweeps of training runs (:mod:`.sweep`) and scaling-law fits (:mod:`.fit`)."""
