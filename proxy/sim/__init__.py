"""A simulated Yahoo-Finance-shaped market-data API to put behind the proxy."""

from proxy.sim.app import SIM_STATS, SimConfig, SimStats, make_sim_app

__all__ = ["SIM_STATS", "SimConfig", "SimStats", "make_sim_app"]
