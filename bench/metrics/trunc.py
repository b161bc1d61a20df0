"""Global truncation error against a float64 reference solve of the same ODE from the same x_T.

The reference integrates d x_hat/d log sigma_hat = sigma_hat eps (EDM form) with torchdiffeq's dopri5 at tight
tolerance from sigma_hat(T) to sigma_hat(t_min) and then takes the same final step as the solvers
(x0-prediction at the last positive sigma), so the error measures the solver's discretisation of
[t_min, T]; it is reported as RMS per dimension over all samples.
"""
from __future__ import annotations

import torch

from bench.metrics import Metric, MetricContext, register_metric
from models.dynamics import Dynamics
from solvers.adaptive import solve_log_sigma_hat


def reference_solve(net, schedule, x_T, t_start, t_end, rtol=1e-8, atol=1e-8, method="dopri5"):
    """float64 solution x_0 of the probability-flow ODE from x_T at t_start, ending with x0-prediction at t_end.

    Integrated in u = log sigma_hat, d x_hat/du = sigma_hat eps: smooth over the whole range, and an
    adaptive step that overshoots the end (torchdiffeq steps past t1 and interpolates) stays at sigma_hat > 0.
    Returns (x_0, nfe used)."""
    dyn = Dynamics(net, schedule)
    t = torch.tensor([float(t_start), float(t_end)], dtype=torch.float64)
    return solve_log_sigma_hat(dyn, x_T.to(torch.float64), t, rtol, atol, method), dyn.nfe


def rms(a, b):
    return float(torch.sqrt(((a.double() - b.double()) ** 2).mean()))


@register_metric("trunc")
class TruncationError(Metric):
    def __init__(self, rtol: float = 1e-8, atol: float = 1e-8, method: str = "dopri5"):
        super().__init__(rtol=rtol, atol=atol, method=method)

    def protocol(self, ctx):
        return {"metric": "trunc", "reference": self.knobs["method"], "reference_dtype": "float64",
                "rtol": self.knobs["rtol"], "atol": self.knobs["atol"], "variable": "log_sigma_hat",
                "final_step": "denoise", "statistic": "rms_per_dim", "n_samples": int(ctx.samples.shape[0])}

    def compute(self, ctx: MetricContext) -> dict:
        if ctx.spec.stochastic:
            return {"trunc_rms": None, "trunc_note": "n/a: stochastic solver (no ODE reference)"}
        m = ctx.model
        refs, nfe = [], 0
        for i in range(0, ctx.x_T.shape[0], ctx.batch_size):
            xb = ctx.x_T[i:i + ctx.batch_size]
            with torch.inference_mode():
                r, n = reference_solve(m.net, m.schedule, xb, ctx.t[0], ctx.t[-1], **self.knobs)
            refs.append(r)
            nfe = max(nfe, n)
        ref = torch.cat(refs).to(ctx.samples.device)
        ctx.cache["trunc_reference"] = ref
        return {"trunc_rms": rms(ctx.samples, ref), "trunc_ref_nfe": nfe}
