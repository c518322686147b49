"""The namespace lab: a sealed little internet on one machine (see ``lab.py``)."""

from meshvpn.lab.lab import Lab
from meshvpn.lab.topology import LabPlan, plan_lab

__all__ = ["Lab", "LabPlan", "plan_lab"]
