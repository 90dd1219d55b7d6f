"""Scaling studies: sweeps of training runs (:mod:`.sweep`), scaling-law fits (:mod:`.fit`), and
the calibration of the law ``model=auto`` plans with on this machine (:mod:`.calibrate`)."""
