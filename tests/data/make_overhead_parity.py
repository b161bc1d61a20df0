"""Writes tests/data/overhead_parity.npz: every solver's float64 output on the exact gmm for one fixed x_T and one
fixed noise sequence, as produced by the code before issue 17 moved grid coefficients out of the step loops.
tests/test_overhead_parity.py reruns the same cases and asks for agreement to 1e-12: the speed-ups changed where
numbers are computed, not which numbers.

    python tests/data/make_overhead_parity.py          (rewrites the fixture: only when a formula is meant to change)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).with_name("overhead_parity.npz")
N, SEED, NFE = 8, 11, 13
MODEL = {"name": "gmm", "dim": 4, "n_components": 3, "seed": 0, "schedule": {"name": "vp_linear"}}

# (case name, solver, knobs): every solver whose step loop reads grid coefficients, and the knobs that pick other
# coefficient tables (orders, variants, variables, start-ups).
CASES = [
    *[(n, n, {}) for n in ("euler", "heun", "midpoint", "ralston", "rk3", "rk4")],
    ("heun_t", "heun", {"variable": "t"}), ("rk4_lambda", "rk4", {"variable": "lambda"}),
    *[(f"ab{k}", "ab", {"order": k}) for k in (1, 2, 3, 4)],
    ("ab3_rk", "ab", {"order": 3, "startup": "rk"}), ("ab4_rk", "ab", {"order": 4, "startup": "rk"}),
    ("ab4_ipndm", "ab", {"order": 4, "ipndm": True}), ("ab3_t", "ab", {"order": 3, "variable": "t"}),
    ("ab3_lambda", "ab", {"order": 3, "variable": "lambda"}),
    *[(f"unipc{k}_{v}", "unipc", {"order": k, "variant": v}) for k in (1, 2, 3) for v in ("bh1", "bh2")],
    ("unipc3_nolof", "unipc", {"order": 3, "lower_order_final": False}),
    *[(f"dpm_solver{k}", "dpm_solver", {"order": k}) for k in (1, 2, 3)],
    ("dpm_solver_fast", "dpm_solver", {"fast": True}),
    *[(f"dpm_pp{k}m", "dpm_solver_pp", {"order": k}) for k in (1, 2, 3)],
    ("dpm_pp3m_taylor", "dpm_solver_pp", {"order": 3, "d2": "taylor"}),
    ("dpm_pp2s", "dpm_solver_pp", {"order": 2, "method": "singlestep"}),
    ("deis", "deis", {}), ("deis_rk", "deis", {"order": 3, "startup": "rk"}), ("ipndm_v", "ipndm_v", {}),
    # stochastic: the noise comes from _FixedNoise below, in the order the solver asks for it
    ("euler_maruyama", "euler_maruyama", {}),
    ("ancestral", "ancestral", {}), ("ancestral_euler", "ancestral", {"variant": "euler", "eta": 0.7}),
    ("ancestral_beta", "ancestral", {"variance": "beta"}),
    ("edm_stochastic", "edm_stochastic", {"S_churn": 40.0, "S_max": 50.0}),
    ("pc", "pc", {}), ("pc_em_sigma2", "pc", {"predictor": "euler_maruyama", "step_size": "sigma2"}),
    ("dpm_pp_sde2", "dpm_solver_pp_sde", {}), ("dpm_pp_sde3", "dpm_solver_pp_sde", {"order": 3}),
    ("sa_solver", "sa_solver", {}), ("restart", "restart", {"restart": [[0.06, 0.30, 2, 2]]}),
]


class _FixedNoise:
    """One torch generator drawn in call order: the same noise for the same sequence of requests, whatever
    PerSampleRNG does (the per-sample stream is not what this fixture pins down)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.g, dtype=torch.float64).to(x.dtype)

    def randn(self, shape, dtype=None):
        return torch.randn((N, *shape), generator=self.g, dtype=torch.float64)

    def increment(self, x, t_from, t_to):
        return self.randn_like(x)


def run_cases():
    from bench.models.dynamics import Dynamics
    from bench.models.registry import load_model
    from bench.solvers.registry import get_solver
    from bench.solvers.timesteps import make_timesteps

    model = load_model(MODEL)
    x_T = torch.randn((N, *model.shape), generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    x_T = x_T * model.schedule.prior_std()
    out = {"x_T": x_T.numpy()}
    for name, solver, knobs in CASES:
        spec = get_solver(solver)
        steps = spec.steps_for(NFE, **knobs)
        t = make_timesteps(spec.default_timesteps, model.schedule, steps)
        dyn = Dynamics(model.net, model.schedule)
        with torch.inference_mode():
            x0 = spec.fn(dyn, x_T.clone(), t, _FixedNoise(SEED + 1), **knobs)
        out[name] = x0.double().numpy()
        out[name + "__nfe"] = np.array(dyn.nfe)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    res = run_cases()
    np.savez_compressed(OUT, **res)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(CASES)} cases)")
