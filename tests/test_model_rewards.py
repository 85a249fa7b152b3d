"""The model rewards on tiny random weights: each loader (and the HPSv2 / ImageReward key maps, fed checkpoints
in the original layout) gives the scores of a direct computation here; the shipped LAION head is the real one."""
import pytest
import torch
import torch.nn.functional as F

import reward_testing as rt
from fastdag.config import ConfigError
from fastdag.rewards import REWARDS, build_reward
from fastdag.rewards.loading import MLPHead, load_state_dict
from fastdag.rewards.preprocess import CLIP_MEAN, CLIP_STD, resize_center_crop

PROMPTS = ["a red cat", "the blue dog in the city", "a fish", "green bird"]


def norm(images):
    return (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_registry_lists_the_model_rewards():
    assert {"laion_aesthetic", "pickscore", "hpsv2", "imagereward"} <= set(REWARDS)


def test_resize_center_crop():
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(resize_center_crop(x, 16), x)  # the model's size: untouched
    wide = torch.rand(2, 3, 32, 48)
    out = resize_center_crop(wide, 16)
    full = F.interpolate(wide, size=(16, 24), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(out, full[..., :, 4:20])
    flat = torch.full((1, 3, 40, 40), 0.3)  # a flat image stays flat through the antialiased resize
    torch.testing.assert_close(resize_center_crop(flat, 16), torch.full((1, 3, 16, 16), 0.3))


def test_shipped_laion_head_is_the_published_one(shared_data):
    from fastdag.rewards.laion_aesthetic import HEAD

    ours = load_state_dict(HEAD)
    pth = torch.load(shared_data / "reward-heads/sac+logos+ava1-l14-linearMSE.pth", map_location="cpu",
                     weights_only=True)
    assert set(ours) == set(pth) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    for k in pth:
        assert torch.equal(ours[k], pth[k].cpu()), k


def test_shipped_laion_head_scores_a_unit_embedding():
    from fastdag.rewards.laion_aesthetic import HEAD

    state = load_state_dict(HEAD)
    head = MLPHead.from_state_dict(state).eval()
    e = unit(torch.randn(3, 768))
    x = e
    for i in (0, 2, 4, 6, 7):  # Linear/Dropout only: an affine chain
        x = x @ state[f"layers.{i}.weight"].t() + state[f"layers.{i}.bias"]
    torch.testing.assert_close(head(e), x[:, 0], rtol=1e-5, atol=1e-5)
    assert head(e).shape == (3,) and torch.isfinite(head(e)).all()


def test_laion_aesthetic_tiny(tmp_path):
    kwargs, model, head = rt.laion(tmp_path)
    images = torch.rand(4, 3, 16, 16)
    got = build_reward("laion_aesthetic", kwargs)(images, PROMPTS)
    with torch.no_grad():
        want = head(unit(model(pixel_values=norm(images)).image_embeds))
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pickscore_tiny(tmp_path):
    kwargs, model, tok = rt.pickscore(tmp_path)
    images = torch.rand(4, 3, 16, 16)
    got = build_reward("pickscore", kwargs)(images, PROMPTS)
    with torch.no_grad():
        img = model.vision_model(pixel_values=norm(images)).pooler_output @ model.visual_projection.weight.t()
        t = tok(PROMPTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
        txt = model.text_model(input_ids=t.input_ids, attention_mask=t.attention_mask).pooler_output
        txt = txt @ model.text_projection.weight.t()
        want = model.logit_scale.exp() * (unit(img) * unit(txt)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _clip_cosine(model, tok, images, prompts, max_length):
    with torch.no_grad():
        img = model.vision_model(pixel_values=norm(images)).pooler_output @ model.visual_projection.weight.t()
        # open_clip: the text features are read at the end-of-text token
        t = tok(prompts, padding="max_length", max_length=max_length, return_tensors="pt")
        hidden = model.text_model(input_ids=t.input_ids).last_hidden_state
        eot = (t.input_ids == tok.eos_token_id).int().argmax(-1)
        txt = hidden[torch.arange(len(prompts)), eot] @ model.text_projection.weight.t()
    return (unit(img) * unit(txt)).sum(-1)


def test_hpsv2_converts_an_open_clip_checkpoint(tmp_path):
    kwargs, model, tok = rt.hpsv2(tmp_path)
    images = torch.rand(4, 3, 16, 16)
    reward = build_reward("hpsv2", kwargs)
    got = reward(images, PROMPTS)
    want = _clip_cosine(model, tok, images, PROMPTS, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cached = list((tmp_path / "cache").glob("hpsv2-HPS_v2_compressed-*.safetensors"))
    assert len(cached) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_hpsv2_cache_is_reused(tmp_path):
    kwargs, model, tok = rt.hpsv2(tmp_path)
    images = torch.rand(2, 3, 16, 16)
    first = build_reward("hpsv2", kwargs)(images, PROMPTS[:2])
    (cached,) = (tmp_path / "cache").glob("*.safetensors")
    with torch.no_grad():  # poison the cache: a reload must read it, not reconvert the checkpoint
        from safetensors.torch import load_file, save_file

        w = load_file(str(cached))
        w["logit_scale"] = w["logit_scale"] + 1  # HPSv2 ignores the logit scale: scores unchanged
        w["visual_projection.weight"] = -w["visual_projection.weight"]
        save_file(w, str(cached))
    second = build_reward("hpsv2", kwargs)(images, PROMPTS[:2])
    torch.testing.assert_close(second, -first, rtol=1e-5, atol=1e-5)


def test_imagereward_converts_its_checkpoint(tmp_path):
    from fastdag.rewards.imagereward import MAX_LENGTH, MEAN, STD

    kwargs, model, tok = rt.imagereward(tmp_path)
    images = torch.rand(4, 3, 16, 16)
    got = build_reward("imagereward", kwargs)(images, PROMPTS)
    with torch.no_grad():
        emb = model.vision_model(pixel_values=norm(images)).last_hidden_state
        t = tok(PROMPTS, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        h = model.text_encoder(input_ids=t.input_ids, attention_mask=t.attention_mask, encoder_hidden_states=emb,
                               encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long)).last_hidden_state
        x = h[:, 0]
        for layer in model.mlp.layers:
            x = layer(x)
        want = (x[:, 0] - MEAN) / STD
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.std() > 0  # the prompts and images matter


def test_checkpoint_of_another_architecture_is_one_line(tmp_path):
    kwargs, _, _ = rt.imagereward(tmp_path)
    kwargs = {**kwargs, "arch": {**rt.IR_ARCH, "text": {**rt.IR_ARCH["text"], "num_hidden_layers": 3}}}
    with pytest.raises(ConfigError, match="does not match the architecture.*reward.kwargs.arch"):
        build_reward("imagereward", kwargs)


def test_pickles_load_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "ImageReward.pt")
    with pytest.raises(ConfigError, match="weights-only"):
        build_reward("imagereward", {"model": str(tmp_path), "device": "cpu", "arch": rt.IR_ARCH})


def test_missing_weights_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="reward.kwargs.model: directory .* has no HPS_v2.1_compressed.pt"):
        build_reward("hpsv2", {"model": str(tmp_path), "version": "2.1", "device": "cpu"})
    with pytest.raises(ConfigError, match="reward.kwargs.version"):
        build_reward("hpsv2", {"model": str(tmp_path), "version": "3", "device": "cpu"})
