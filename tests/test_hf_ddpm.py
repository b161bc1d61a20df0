"""model=hf_ddpm: a tiny diffusers UNet2DModel saved to disk, loaded through our loader, wrapped in continuous time."""
import json

import pytest
import torch

from bench.models.errors import ConfigError  # noqa: E402
from bench.models.hf_ddpm import load_hf_ddpm  # noqa: E402

N = 50


def _tiny(tmp_path, layout):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    with torch.no_grad():  # non-trivial output (diffusers zero-inits nothing here, but make it explicit)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = diffusers.DDPMScheduler(num_train_timesteps=N, beta_schedule="squaredcos_cap_v2")
    root = tmp_path / layout
    if layout == "pipeline":
        unet.save_pretrained(root / "unet")
        sched.save_pretrained(root / "scheduler")
        (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    else:
        unet.save_pretrained(root)
        sched.save_pretrained(root)
    return root, unet.eval(), sched


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pipeline", "flat"])
def test_eps_at_discrete_steps_equals_the_unet_call(tmp_path, layout):
    root, unet, sched = _tiny(tmp_path, layout)
    model = load_hf_ddpm({"name": "hf_ddpm", "path": str(root)})
    assert model.shape == (2, 8, 8) and model.data_range == (-1.0, 1.0)
    x = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    for n in (0, 7, 31, N - 1):
        t = torch.full((4,), (n + 1) / N, dtype=torch.float64)
        ours = model.net(x, t.float())
        with torch.no_grad():
            ref = unet(x, torch.full((4,), n)).sample
        assert torch.allclose(ours, ref, atol=1e-5), (n, (ours - ref).abs().max())
        # the continuous schedule hits the scheduler's alpha_bar at t_n = (n+1)/N
        assert torch.allclose(model.schedule.alpha(t[:1]) ** 2, sched.alphas_cumprod[n].double(), rtol=1e-5)
    assert model.schedule.t_min == pytest.approx(1 / N) and model.schedule.T == 1.0


@pytest.mark.slow
def test_float64_call_matches_float32(tmp_path):
    root, _, _ = _tiny(tmp_path, "pipeline")
    model = load_hf_ddpm({"name": "hf_ddpm", "path": str(root)})
    x, t = torch.randn(3, 2, 8, 8), torch.full((3,), 0.5)
    assert torch.allclose(model.net(x, t).double(), model.net(x.double(), t.double()), atol=1e-5)


def test_unknown_hub_id_offline_names_the_id(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'nobody-here/no-such-ddpm'.*not in the local Hugging Face cache"):
        load_hf_ddpm({"name": "hf_ddpm", "path": "nobody-here/no-such-ddpm", "local_files_only": True})


def test_directory_without_unet_or_scheduler(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="neither unet/config.json"):
        load_hf_ddpm({"name": "hf_ddpm", "path": str(tmp_path)})


