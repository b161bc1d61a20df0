"""model=hf_ddpm: a diffusers UNet2DModel + DDPM scheduler config, as a discrete-time eps-model in continuous time.

The discrete model eps_theta(x, n), n = 0..N-1, trained on betas_1..N, is wrapped the way DPM-Solver wraps
discrete models (Lu et al. 2022, app. D): schedule vp_discrete built from the scheduler's betas (log alpha
interpolated over t_n = (n+1)/N) and network input (t - 1/N) * N, so eps(x, t_n) = eps_theta(x, n).
Nothing is downloaded unless the config says local_files_only: false.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bench.models.errors import ConfigError
from bench.models.netio import EpsAdapter, check_output_shape
from bench.models.registry import LoadedModel, register_model
from bench.models.schedules import VPDiscrete, check_schedule
from bench.models.user_data import real_data_from_cfg

SCHEDULER_FILE = "scheduler_config.json"
# The scheduler config's prediction_type -> what the UNet predicts (models/dynamics.py converts it to eps):
# epsilon (Ho et al. 2020), v_prediction (v = alpha eps - sigma x0, Salimans & Ho 2022), sample (x0).
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError("model=hf_ddpm needs the optional package diffusers: pip install -e '.[hf]'") from None
    return diffusers


def resolve_dir(path: str, local_files_only: bool, revision=None) -> Path:
    """A local directory as given, or the (cached) snapshot of a hub id; a clear error when neither exists."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise ConfigError(f"model=hf_ddpm: '{path}' is neither a local directory nor a hub id of the form owner/name.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError("model=hf_ddpm with a hub id needs the optional extra: pip install -e '.[hf]'") from None
    try:
        return Path(snapshot_download(str(path), revision=revision, local_files_only=local_files_only))
    except Exception as e:
        how = ("it is not in the local Hugging Face cache and local_files_only is true (nothing is downloaded)"
               if local_files_only else "it could not be fetched")
        raise ConfigError(f"model=hf_ddpm: hub id '{path}' could not be loaded: {how} "
                          f"({type(e).__name__}). Give a local directory with unet/ and scheduler/ "
                          f"(or config.json + {SCHEDULER_FILE}), or set model.local_files_only=false "
                          f"to download.") from None


def find_parts(root: Path) -> tuple[Path, Path]:
    """(unet dir, scheduler config file) in the pipeline layout (unet/, scheduler/) or the flat layout."""
    for unet_dir, sched in ((root / "unet", root / "scheduler" / SCHEDULER_FILE), (root, root / SCHEDULER_FILE)):
        if (unet_dir / "config.json").is_file() and sched.is_file():
            return unet_dir, sched
    raise ConfigError(f"model=hf_ddpm: '{root}' has neither unet/config.json + scheduler/{SCHEDULER_FILE} "
                      f"(pipeline layout) nor config.json + {SCHEDULER_FILE} (flat layout).")


class DiscreteEps(nn.Module):
    """eps(x, t) = UNet(x, (t - 1/N) N): continuous t in [1/N, 1] to the discrete step n in [0, N-1]."""

    def __init__(self, unet: nn.Module, n_steps: int):
        super().__init__()
        self.unet, self.N = unet, n_steps

    def forward(self, x, t):
        return self.unet(x, (t - 1.0 / self.N) * self.N).sample


@register_model("hf_ddpm")
def load_hf_ddpm(cfg: dict) -> LoadedModel:
    root = resolve_dir(cfg.get("path"), bool(cfg.get("local_files_only", True)), cfg.get("revision"))
    unet_dir, sched_file = find_parts(root)
    diffusers = _import_diffusers()
    try:
        scheduler = diffusers.DDPMScheduler.from_config(json.loads(sched_file.read_text()))
    except Exception as e:
        raise ConfigError(f"model=hf_ddpm: scheduler config '{sched_file}' is not a DDPM-style scheduler "
                          f"({type(e).__name__}: {e})") from None
    pred = scheduler.config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ConfigError(f"model=hf_ddpm: '{sched_file}' has prediction_type '{pred}'; supported are "
                          f"{', '.join(PREDICTION_TYPES)}.")
    parametrization = PREDICTION_TYPES[pred]
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True)
    except Exception as e:
        raise ConfigError(f"model=hf_ddpm: UNet2DModel in '{unet_dir}' could not be loaded "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    unet = unet.eval().requires_grad_(False)
    betas = scheduler.betas.double()
    schedule = VPDiscrete(betas=betas.tolist(), T=float(cfg.get("T", 1.0)), t_min=cfg.get("t_min"),
                          lambda_min_clipped=cfg.get("lambda_min_clipped"))
    check_schedule(schedule)     # T and t_min within the scheduler's steps [1/N, 1]
    size = unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    shape = (unet.config.in_channels, *size)
    if unet.config.out_channels != unet.config.in_channels:
        raise ConfigError(f"model=hf_ddpm: UNet in '{unet_dir}' maps {unet.config.in_channels} to "
                          f"{unet.config.out_channels} channels; an eps-model must return its input's shape.")
    net = EpsAdapter(DiscreteEps(unet, len(betas)))
    check_output_shape(net, shape, "model=hf_ddpm", unet_dir, t=float(schedule.T))
    lo, hi = cfg.get("data_range") or (-1.0, 1.0)
    data = real_data_from_cfg(cfg, shape, (float(lo), float(hi)), cfg.get("n_levels"), f"hf:{cfg.get('path')}",
                              "model=hf_ddpm")
    return LoadedModel("hf_ddpm", net, schedule, shape, **data, parametrization=parametrization,    # real_data, feature_net, dataset_id, range, levels
                       info={"path": str(cfg.get("path")), "num_train_timesteps": len(betas),
                             "beta_schedule": scheduler.config.get("beta_schedule")})
