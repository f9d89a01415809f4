"""A diffusers scheduler's configuration in fastddpm's terms: the config reader, the prediction
and variance names, and DPMSolverMultistepScheduler's options (what is honoured, what is
refused). The bottom of the diffusers bridges: diffusers_config -> diffusers_sigmas ->
diffusers_schedule -> schedule -> compat; it imports nothing of fastddpm.
"""
from __future__ import annotations

PREDICTION_FROM_DIFFUSERS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCE_FROM_DIFFUSERS = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                           "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
                           "learned_range": "learned_range"}


def _cfg(scheduler, name, default=None):
    cfg = getattr(scheduler, "config", None)
    if cfg is None:
        return default
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)



# DPMSolverMultistepScheduler options fastddpm cannot honour: (config name, value it needs, why)
_DPM_REFUSED = (
    ("thresholding", False, "dynamic thresholding; fastddpm supports fixed clipping only (clip=)"),
    ("use_exponential_sigmas", False, "another sigma family (noise levels between training timesteps)"),
    ("use_beta_sigmas", False, "another sigma family (noise levels between training timesteps)"),
    ("use_lu_lambdas", False, "another sigma family (noise levels between training timesteps)"),
    ("use_flow_sigmas", False, "flow-matching sigmas"),
    ("use_dynamic_shifting", False, "flow-matching timestep shifting"),
    ("final_sigmas_type", "zero", "the last step to sigma_min; fastddpm's last step goes to sigma 0"),
    ("variance_type", None, "a learned variance output"),
    ("rescale_betas_zero_snr", False, "zero-terminal-SNR rescaling"),
)


def dpm_solver_options(scheduler) -> dict:
    """method / order / solver_type / prediction / clip of a diffusers DPMSolverMultistepScheduler.

    lower_order_final and euler_at_final are accepted either way: with final_sigmas_type="zero"
    (the only one supported) diffusers' last step is first order whatever they say, as is
    fastddpm's, and with solver_order <= 2 they change nothing else."""
    kind = type(scheduler).__name__
    for name, need, why in _DPM_REFUSED:
        got = _cfg(scheduler, name, need)
        if got != need:
            raise NotImplementedError(f"{kind} has {name}={got!r} ({why}); fastddpm supports {name}={need!r} only")
    lmc = _cfg(scheduler, "lambda_min_clipped", -float("inf"))
    if lmc != -float("inf"):
        raise NotImplementedError(f"{kind} has lambda_min_clipped={lmc!r}, which drops the last training steps; "
                                  "fastddpm supports -inf (no clipping) only")
    algo = _cfg(scheduler, "algorithm_type", "dpmsolver++")
    if algo not in ("dpmsolver++", "sde-dpmsolver++"):
        raise NotImplementedError(f"{kind} has algorithm_type={algo!r} (noise prediction DPM-Solver); supported: "
                                  "'dpmsolver++', 'sde-dpmsolver++'")
    order = _cfg(scheduler, "solver_order", 2)
    if order not in (1, 2):
        raise NotImplementedError(f"{kind} has solver_order={order!r}; supported: 1, 2")
    solver_type = _cfg(scheduler, "solver_type", "midpoint")
    if solver_type not in ("midpoint", "heun"):
        raise NotImplementedError(f"{kind} has solver_type={solver_type!r}; supported: 'midpoint', 'heun'")
    pt = _cfg(scheduler, "prediction_type", "epsilon")
    if pt not in PREDICTION_FROM_DIFFUSERS:
        raise NotImplementedError(f"{kind} prediction_type={pt!r} is not supported; "
                                  f"supported: {sorted(PREDICTION_FROM_DIFFUSERS)}")
    return {"prediction": PREDICTION_FROM_DIFFUSERS[pt], "clip": None, "method": algo, "order": int(order),
            "solver_type": solver_type}
