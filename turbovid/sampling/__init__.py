"""Schedules and solvers as pure functions: rCM few-step (rcm.py) and teacher flow matching (flow.py)."""
from turbovid.sampling.flow import cfg_velocity, euler_sample, flow_network_time, flow_times, unipc_sample
from turbovid.sampling.rcm import (
    MID_ANGLES,
    Velocity,
    check_mid_angles,
    expert_for_step,
    experts_for_schedule,
    network_time,
    parse_mid_angles,
    rcm_sample,
    rcm_times,
)

__all__ = [
    "MID_ANGLES", "Velocity", "cfg_velocity", "check_mid_angles", "euler_sample", "expert_for_step",
    "experts_for_schedule", "flow_network_time", "flow_times", "network_time", "parse_mid_angles", "rcm_sample",
    "rcm_times", "unipc_sample",
]
