"""Model factory (every registered config builds) and checkpoint I/O (round trips, reference layout, bad files)."""

from __future__ import annotations

import hashlib
import json
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cleansweep import models
from cleansweep.errors import UserError


@pytest.fixture(scope="module")
def tiny():
    return models.create_model("tiny-rn", seed=0)


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_list_models_has_ours_and_open_clip_names():
    names = models.list_models()
    assert {"tiny-rn", "tiny-vit", "RN50", "ViT-B-32"} <= set(names)


def _unregistered(config_dir) -> list[str]:
    """JSON configs in `config_dir` that open_clip or `models.list_models()` does not know (open_clip skips a JSON
    without embed_dim, vision_cfg and text_cfg silently)."""
    import open_clip

    known = set(open_clip.list_models()) & set(models.list_models())
    return [p.name for p in sorted(config_dir.glob("*.json")) if p.stem not in known]


def test_every_config_json_is_registered():
    assert sorted(models.CONFIG_DIR.glob("*.json")) and _unregistered(models.CONFIG_DIR) == []


def test_the_registration_check_catches_a_json_nobody_registered(tmp_path):
    (tmp_path / "tiny-new.json").write_text((models.CONFIG_DIR / "tiny-rn.json").read_text())
    assert _unregistered(tmp_path) == ["tiny-new.json"]


@pytest.mark.parametrize("path", sorted(models.CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_config_json_is_parsed_and_creatable(path):
    import open_clip

    cfg = json.loads(path.read_text())
    assert open_clip.get_model_config(path.stem) == cfg  # the JSON is what open_clip builds from
    with torch.device("meta"):
        size = sum(p.numel() for p in models.create_model(path.stem, seed=0).model.parameters())
    if size > 50_000_000:
        return  # a big model: registered and parsed is what a CPU test checks (test_every_registered_config_builds)
    bundle = models.create_model(path.stem, seed=0)  # a tiny one: built for real and run
    side = cfg["vision_cfg"]["image_size"]
    out = bundle.model(torch.rand(2, 3, side, side), bundle.tokenizer(["a cat", "a dog"]))
    assert out["image_features"].shape == out["text_features"].shape == (2, cfg["embed_dim"])
    assert torch.isfinite(out["image_features"]).all() and torch.isfinite(out["text_features"]).all()
    assert path.stem in models.MODELS[path.stem]  # its description names its file


@pytest.mark.parametrize("name", sorted(models.OPEN_CLIP_MODELS))
def test_open_clip_models_we_offer_are_registered_and_parsed(name):
    import open_clip

    cfg = open_clip.get_model_config(name)
    assert name in open_clip.list_models() and {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg)
    assert models.model_image_size(name) == cfg["vision_cfg"]["image_size"] == 224


def test_unknown_model_names_the_choices():
    with pytest.raises(UserError, match=r"unknown model 'RN51'; choose from: .*tiny-rn.*RN50"):
        models.create_model("RN51")


@pytest.mark.parametrize("name", models.list_models())
def test_every_registered_config_builds(name):
    # Built on the meta device: checks the config and the bundle without allocating 100M+ parameters.
    with torch.device("meta"):
        bundle = models.create_model(name, seed=0)
    cfg = __import__("open_clip").get_model_config(name)
    assert bundle.name == name == bundle.model.model_name
    assert bundle.image_size == cfg["vision_cfg"]["image_size"]
    assert bundle.tokenizer(["a photo of a banana"]).shape == (1, cfg["text_cfg"]["context_length"])
    assert bundle.model.text_projection.shape[1] == cfg["embed_dim"]


@pytest.mark.parametrize("name", ["tiny-rn", "tiny-vit"])
def test_tiny_forward_gives_normalised_features_and_log_scale(name):
    bundle = models.create_model(name, seed=0)
    assert bundle.image_size == 32 and bundle.tokenizer.context_length == 32
    images = torch.rand(3, 3, 32, 32)
    out = bundle.model(images, bundle.tokenizer(["a", "b c", "d e f"]))
    assert out["image_features"].shape == out["text_features"].shape == (3, 64)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))
    # The log parameter itself (open_clip would return exp of it): initial ln(1/0.07).
    assert out["logit_scale"] is bundle.model.logit_scale
    assert math.isclose(out["logit_scale"].item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_long_captions_keep_end_of_text(tiny):
    tokens = tiny.tokenizer([" ".join(["word"] * 100)])
    eot = tiny.tokenizer.eot_token_id
    assert tokens.shape == (1, 32) and tokens[0, -1].item() == eot


def test_seed_controls_init_and_leaves_global_rng_alone(tiny):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    again = models.create_model("tiny-rn", seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    assert _equal_state(again.model.state_dict(), tiny.model.state_dict())
    other = models.create_model("tiny-rn", seed=1)
    assert not torch.equal(other.model.visual.conv1.weight, tiny.model.visual.conv1.weight)


def test_preprocess_is_deterministic_val_style(tiny):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    a, b = tiny.preprocess_train(image), tiny.preprocess_train(image)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    torch.testing.assert_close(a, tiny.preprocess_val(image))
    # A constant colour survives resize and crop, so the output is exactly (v / 255 - mean) / std per channel.
    colour = (10, 128, 250)
    flat = tiny.preprocess_train(Image.new("RGB", (40, 90), colour))
    expected = (torch.tensor(colour) / 255 - torch.tensor(tiny.mean)) / torch.tensor(tiny.std)
    torch.testing.assert_close(flat, expected.view(3, 1, 1).expand(3, 32, 32), atol=1e-5, rtol=0)
    assert tiny.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_checkpoint_round_trip_with_card(tmp_path, tiny):
    path = models.save_checkpoint(tmp_path / "ckpt.safetensors", tiny.model, {"step": 7, "note": tmp_path})
    card = models.read_card(path)
    assert card["model"] == "tiny-rn" and card["step"] == 7 and card["note"] == str(tmp_path)
    assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.json", "ckpt.safetensors"]  # no temp leftovers
    fresh = models.create_model("tiny-rn", seed=5)
    models.load_weights(fresh.model, models.load_state_dict_file(path))
    assert _equal_state(fresh.model.state_dict(), tiny.model.state_dict())


def test_save_requires_safetensors_suffix(tmp_path, tiny):
    with pytest.raises(UserError, match=r"must end in \.safetensors"):
        models.save_checkpoint(tmp_path / "x.pt", tiny.model, {})


def test_reference_layout_pt_with_module_prefix_loads(tmp_path, tiny):
    opt = torch.optim.AdamW(tiny.model.parameters())
    state = {"module." + k: v for k, v in tiny.model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state, "optimizer": opt.state_dict()}, tmp_path / "e3.pt")
    loaded = models.load_state_dict_file(tmp_path / "e3.pt")
    assert _equal_state(loaded, tiny.model.state_dict())


class _Boom:
    def __reduce__(self):
        import os

        return (os.mkdir, (self.target,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_with_code_is_refused_and_not_run(tmp_path, protocol):
    boom = _Boom()
    boom.target = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": boom}, f, protocol=protocol)
    with pytest.raises(UserError, match=r"evil\.pt: torch.load\(weights_only=True\) refused it") as e:
        models.load_state_dict_file(path)
    assert not (tmp_path / "pwned").exists()
    # torch's own message advises loading with weights_only=False, which would run the file's code: never repeat it.
    assert "weights_only=False" not in str(e.value) and "False" not in str(e.value) and "\n" not in str(e.value)


def test_torch_saved_pickle_with_code_names_the_refused_global(tmp_path):
    boom = _Boom()
    boom.target = str(tmp_path / "pwned")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": boom}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as e:
        models.load_state_dict_file(tmp_path / "evil.pt")
    msg = str(e.value)
    assert not (tmp_path / "pwned").exists()
    assert "GLOBAL" in msg and "weights_only=False" not in msg and "Re-running" not in msg and "trusted" not in msg


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_archive_is_rejected(tmp_path):
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "jit.pt"))
    with pytest.raises(UserError, match="TorchScript"):
        models.load_state_dict_file(tmp_path / "jit.pt")


@pytest.mark.parametrize("name,content,message", [
    ("bad.safetensors", b"\x00\x01garbage", "not a readable safetensors file"),
    ("bad.pt", b"garbage that is not a torch file", "refused it"),
    ("bad.pth", b"", "not a readable PyTorch checkpoint"),
])
def test_corrupt_files_give_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        models.load_state_dict_file(tmp_path / name)
    assert "\n" not in str(err.value) and name in str(err.value)


def test_truncated_safetensors_and_pt(tmp_path, tiny):
    path = models.save_checkpoint(tmp_path / "w.safetensors", tiny.model, {})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="not a readable safetensors"):
        models.load_state_dict_file(path)
    torch.save(tiny.model.state_dict(), tmp_path / "w.pt")
    (tmp_path / "w.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:5000])
    with pytest.raises(UserError, match="w.pt"):
        models.load_state_dict_file(tmp_path / "w.pt")


def test_missing_and_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        models.load_state_dict_file(tmp_path / "nope.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="no model weights found"):
        models.load_state_dict_file(tmp_path / "list.pt")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(UserError, match="no model weights found"):
        models.load_state_dict_file(tmp_path / "meta.pt")


def test_wrong_architecture_names_keys_and_the_right_model(tiny):
    vit = models.create_model("tiny-vit", seed=0)
    with pytest.raises(UserError) as err:
        models.load_weights(tiny.model, vit.model.state_dict())
    msg = str(err.value)
    assert "does not fit model 'tiny-rn'" in msg and "missing" in msg and "unexpected" in msg
    assert "pass --model tiny-vit" in msg and "\n" not in msg


def test_shape_mismatch_is_reported(tiny):
    state = dict(tiny.model.state_dict())
    state["text_projection"] = torch.zeros(64, 32)
    with pytest.raises(UserError, match=r"shape mismatch 1: text_projection \(64, 32\) vs \(64, 64\)"):
        models.load_weights(tiny.model, state)


def test_read_card_missing_and_broken(tmp_path):
    assert models.read_card(tmp_path / "w.safetensors") == {}
    (tmp_path / "w.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable checkpoint card"):
        models.read_card(tmp_path / "w.safetensors")
    (tmp_path / "w.json").write_text(json.dumps([1]))
    with pytest.raises(UserError, match="not a JSON object"):
        models.read_card(tmp_path / "w.safetensors")


def test_file_sha256_is_remembered_only_while_the_file_is_unchanged(tmp_path):
    import os

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 3000)
    assert models.file_sha256(f) == hashlib.sha256(b"a" * 3000).hexdigest()
    assert models.file_sha256(str(f)) == models.file_sha256(f)  # same file, either spelling
    f.write_bytes(b"b" * 3000)  # same size; a rewrite moves mtime (forced here: coarse clocks)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert models.file_sha256(f) == hashlib.sha256(b"b" * 3000).hexdigest()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_are_refused_in_safetensors_and_pt(tmp_path, tiny, bad):
    # All-NaN weights evaluated to top-1 1/classes and ASR 0.0: a model that reads as "cleaned".
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    key = "visual.layer2.0.conv1.weight"
    state[key].view(-1)[3] = bad
    models.save_checkpoint(tmp_path / "w.safetensors", tiny.model, {})
    import safetensors.torch

    safetensors.torch.save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        with pytest.raises(UserError, match=rf"{name}: non-finite weights \(NaN or inf\) in {key}; ") as err:
            models.load_state_dict_file(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="non-finite"):  # every command loads through it
        models.load_checkpoint_model(tmp_path / "w.safetensors")
    state = {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in state.items()}
    safetensors.torch.save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match=r"non-finite weights .* \(\+\d+ more tensors\)"):
        models.load_state_dict_file(tmp_path / "w.safetensors")


def test_model_name_comes_from_the_card_and_rn50_twins_are_never_guessed(tmp_path):
    # RN50 and RN50-quickgelu have the same keys and shapes (zero-storage tensors of those shapes stand in here).
    state = {k: torch.zeros(()).expand(s) for k, s in models._config_shapes("RN50").items()}
    assert models.matching_models(state) == ["RN50", "RN50-quickgelu"]
    path = tmp_path / "openai.safetensors"
    with pytest.raises(UserError, match="no model card next to it and its weights fit RN50 and RN50-quickgelu; "
                                        "pass --model"):
        models.checkpoint_model_name(path, None, state)
    assert models.checkpoint_model_name(path, "RN50-quickgelu", state) == "RN50-quickgelu"  # no card: the given
    models.card_path(path).write_text(json.dumps({"model": "RN50-quickgelu"}))
    assert models.checkpoint_model_name(path, None, state) == "RN50-quickgelu"
    with pytest.raises(UserError, match="--model 'RN50' contradicts its card, which says the model is "
                                        "'RN50-quickgelu'; drop --model") as err:
        models.checkpoint_model_name(path, "RN50", state)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown model 'RN5'"):
        models.checkpoint_model_name(path, "RN5", state)
