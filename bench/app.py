"""The Hydra app behind `python -m bench run`: one job = one benchmark cell."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from models.errors import ConfigError

log = logging.getLogger("bench")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from bench.run import format_summary, run

    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        row = run(plain)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_summary(row))
