"""The flow network against the official code's ConditionalFlow, rebuilt here from alignment/flow.py (the diffusers
blocks it calls, with its arguments), independently of fastdag.objectives.flow_network."""
import pytest
import torch
from torch import nn

from fastdag.config import FlowConfig
from fastdag.objectives.flow_network import FlowNetwork


class OfficialConditionalFlow(nn.Module):
    """alignment/flow.py's ConditionalFlow as train_gfn.py builds it (layers_per_block 1, attention_head_dim 8)."""

    def __init__(self, in_channels, block_out_channels, cross_attention_dim, norm_num_groups=32):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.unets.unet_2d_blocks import get_down_block

        types = ("CrossAttnDownBlock2D",) * (len(block_out_channels) - 1) + ("DownBlock2D",)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], block_out_channels[0] * 4, act_fn="silu")
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList([])
        out = block_out_channels[0]
        for i, kind in enumerate(types):
            inp, out = out, block_out_channels[i]
            self.down_blocks.append(get_down_block(
                kind, num_layers=1, in_channels=inp, out_channels=out, temb_channels=block_out_channels[0] * 4,
                add_downsample=True, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim, num_attention_heads=8, attention_head_dim=8,
                downsample_padding=1))
        self.pool = nn.AvgPool2d(4, stride=4)
        self.fc = nn.Linear(block_out_channels[-1], 1)

    def forward(self, sample, timesteps, encoder_hidden_states):
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=next(self.down_blocks.parameters()).dtype))
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
        return self.fc(self.pool(sample).view(sample.size(0), -1)).squeeze()


def test_official_architecture_is_the_official_network():
    # SD-size latents (64x64 -> 4x4 after four downsamples) at small widths, so the test stays fast
    channels, ctx_dim = [32, 32, 64, 64], 24
    official = OfficialConditionalFlow(4, channels, ctx_dim)
    ours = FlowNetwork(4, FlowConfig(block_out_channels=channels, norm_num_groups=32), ctx_dim)
    state = {k.replace("fc.", "head."): v for k, v in official.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in state.items()}
    ours.load_state_dict(state)
    x, t, cond = torch.randn(3, 4, 64, 64), torch.tensor([999, 500, 1]), torch.randn(3, 7, ctx_dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, cond), official(x, t, cond), rtol=1e-5, atol=1e-5)
    # PyTorch's default init, not zeros: the official head starts random
    assert ours.head.weight.abs().sum() > 0


def test_paper_flow_has_the_official_parameter_count():
    official = OfficialConditionalFlow(4, [64, 128, 256, 256], 768)
    ours = FlowNetwork(4, FlowConfig(), 768)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(official)


@pytest.mark.parametrize("architecture", ["official", "compact"])
@pytest.mark.parametrize("size", [8, 5])
def test_small_latents_and_both_architectures(architecture, size):
    cfg = FlowConfig(block_out_channels=[16, 32], norm_num_groups=8, architecture=architecture)
    flow = FlowNetwork(4, cfg, 12)
    out = flow(torch.randn(2, 4, size, size), torch.tensor([10, 900]), torch.randn(2, 5, 12))
    assert out.shape == (2,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    if architecture == "compact":  # zero-initialised head: log F starts at the beta * r term alone
        assert torch.equal(out, torch.zeros(2))
    unconditional = FlowNetwork(3, cfg)(torch.randn(2, 3, size, size), torch.tensor([10, 900]))
    assert unconditional.shape == (2,)
