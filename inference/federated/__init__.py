"""Federated training with Flower (Message API): a ``ClientApp`` that trains the same networks
with the same step functions as centralised training on a site's own cohort folder, a
``ServerApp`` that aggregates them (FedAvg / FedProx) and writes an ordinary model directory,
the certificates and the process wrappers of a deployment (``glioforecast federate``).

See ``docs/FEDERATED.md``.
"""
