"""Weights in and out: EAT-layout Hugging Face folders (EAT, SSLAM) imported and written,
the release's fairseq .pt written, each against an independent PyTorch model."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file as torch_load_safetensors
from safetensors.torch import save_file as torch_save_safetensors

from asda_jax import (
    checkpoints,
    config_lib,
    hear,
    hf_weights,
    inference,
    release_weights,
    storage,
    torch_import,
)
from asda_jax import model as model_lib
from asda_jax.testing import torch_reference as ref
from tests import train_helpers as th

SMALL = dict(dim=64, depth=2, num_heads=4)
BASE = dict(dim=768, depth=12, num_heads=12)
FRAME_COUNTS = (1024, 512, 200)  # 200 frames: 12 whole patches, the rest dropped


def eat_config(dim, depth, num_heads, num_classes=527, variant="finetune", **extra) -> dict:
    """A config.json as EAT's uploads write it (EATConfig's fields)."""
    return {
        "model_type": "eat", "embed_dim": dim, "depth": depth, "num_heads": num_heads,
        "patch_size": 16, "stride": 16, "in_chans": 1, "mel_bins": 128, "max_length": 768,
        "num_classes": num_classes, "model_variant": variant, "mlp_ratio": 4.0,
        "qkv_bias": True, "drop_rate": 0.0, "attn_drop_rate": 0.0, "activation_dropout": 0.0,
        "post_mlp_drop": 0.0, "start_drop_path_rate": 0.0, "end_drop_path_rate": 0.0,
        "layer_norm_first": False, "norm_eps": 1e-6, "norm_affine": True,
        "fixed_positions": True, "img_size": [1024, 128], **extra,
    }  # fmt: skip


def eat_model(size: dict, num_classes: int, seed: int = 0) -> ref.EatModel:
    return ref.randomize_(ref.EatModel(**size, num_classes=num_classes), seed).eval()


def save_folder(folder, model: ref.EatModel, config: dict):
    """config.json + model.safetensors, written by safetensors' own PyTorch API."""
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch_save_safetensors(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def spectrogram(frames: int, seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, frames, 128)).astype(np.float32)


def imported_export(folder, out):
    imported = hf_weights.import_model(str(folder))
    return checkpoints.export(
        out, imported.params, imported.hub.model, **imported.description(str(folder))
    )


def our_logits(imported: hf_weights.Imported, spec) -> np.ndarray:
    classifier = model_lib.Classifier(imported.hub.model, imported.hub.num_classes)
    params = {k: imported.params[k] for k in ("encoder", "fc_norm", "head")}
    return np.asarray(jax.jit(classifier.apply)({"params": params}, jnp.asarray(spec)))


@pytest.mark.parametrize("size", [SMALL, BASE], ids=["small", "base"])
def test_an_eat_folder_imports_to_the_pytorch_features_and_logits(tmp_path, size):
    torch_model = eat_model(size, 527)
    folder = save_folder(tmp_path / "eat", torch_model, eat_config(**size))
    imported = hf_weights.import_model(str(folder))
    assert imported.hub.model.attention == "plain" and imported.hub.model.mlp_ratio == 4.0
    assert imported.positions_max_difference < 1e-4  # float32 sin/cos of angles to 767
    export = imported_export(folder, tmp_path / "export")
    encode, *_ = inference.load_encoder(export)
    if size is SMALL:  # the HEAR module loads it as any export
        scene = hear.get_scene_embeddings(torch.zeros(2, 16000), hear.load_model(str(export)))
        assert scene.shape == (2, 64) and torch.isfinite(scene).all()
    for frames in FRAME_COUNTS:
        spec = spectrogram(frames, seed=frames, batch=1 if size is BASE else 2)
        with torch.no_grad():
            tokens = torch_model(torch.from_numpy(spec))
            logits = torch_model.model.head(torch_model.model.fc_norm(tokens[:, 0])).numpy()
            features = tokens.numpy()
        assert features.shape[1] == 1 + (frames // 16) * 8
        np.testing.assert_allclose(np.asarray(encode(spec)), features, rtol=0, atol=1e-5)
        np.testing.assert_allclose(our_logits(imported, spec), logits, rtol=0, atol=1e-5)


def test_the_large_size_and_the_pretrained_variant_import(tmp_path):
    size = dict(dim=1024, depth=1, num_heads=16)  # EAT-large's width and heads, one block
    torch_model = eat_model(size, 0)
    config = eat_config(**size, variant="pretrain")
    imported = hf_weights.import_model(str(save_folder(tmp_path / "eat", torch_model, config)))
    assert sorted(imported.params) == ["encoder"] and imported.hub.kind == "pretrained"
    assert imported.hub.model.head_dim == 64 and imported.hub.model.mlp_dim == 4096
    spec = spectrogram(256, batch=1)
    encoder = model_lib.Encoder(imported.hub.model)
    ours = encoder.apply({"params": imported.params["encoder"]}, jnp.asarray(spec)).tokens
    with torch.no_grad():
        np.testing.assert_allclose(ours, torch_model(torch.from_numpy(spec)), atol=1e-5)


AUTHORS_HEAD = {"pooling": "cls", "scores": "sigmoid"}  # EAT's and the release's classifiers


def noisy_classifier(cfg: model_lib.ModelConfig, num_classes: int, seed: int) -> dict:
    """A classifier's parameters of ``cfg`` with non-trivial norms and biases (the
    default init leaves them at ones and zeros), as NumPy arrays."""
    classifier = model_lib.Classifier(cfg, num_classes)
    params = nn.meta.unbox(classifier.init(jax.random.key(seed), jnp.zeros((1, 64, 128))))
    leaves, tree = jax.tree.flatten(params["params"])
    noise = [jax.random.normal(jax.random.key(i), x.shape) * 0.1 for i, x in enumerate(leaves)]
    return jax.tree.unflatten(tree, [np.asarray(x + n) for x, n in zip(leaves, noise, strict=True)])


def our_plain_classifier(seed: int, num_classes: int = 527):
    cfg = model_lib.preset("eat_base", embed_dim=64, depth=2, num_heads=4)
    return cfg, noisy_classifier(cfg, num_classes, seed)


def test_our_model_written_as_an_eat_folder_loads_in_pytorch_and_comes_back_equal(tmp_path):
    cfg, params = our_plain_classifier(0)
    folder = hf_weights.export_model(tmp_path / "hf", params, cfg, 1024, head=AUTHORS_HEAD)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "asda" and config["attention"] == "plain"
    torch_model = ref.EatModel(dim=64, depth=2, num_heads=4, num_classes=527)
    torch_model.load_state_dict(torch_load_safetensors(str(folder / "model.safetensors")))
    spec = spectrogram(512, seed=3)
    imported = hf_weights.import_model(str(folder))
    encoder = model_lib.Encoder(cfg)
    features = encoder.apply({"params": params["encoder"]}, jnp.asarray(spec)).tokens
    with torch.no_grad():
        np.testing.assert_allclose(features, torch_model(torch.from_numpy(spec)), atol=1e-5)
        np.testing.assert_allclose(
            our_logits(imported, spec), torch_model.logits(torch.from_numpy(spec)), atol=1e-5
        )
    jax.tree.map(np.testing.assert_array_equal, imported.params, params)  # identical
    with pytest.raises(FileExistsError):
        hf_weights.export_model(folder, params, cfg, 1024, head=AUTHORS_HEAD)


def test_the_release_form_has_no_eat_layout():
    cfg = model_lib.preset("tiny")
    with pytest.raises(ValueError, match="fairseq"):
        hf_weights.config_fields(cfg, "pretrained", 527, 1024)


def our_release_params(seed: int, pretraining: bool):
    """Random parameters of a small release-form model: {encoder, decoder, teacher} or a
    classifier's {encoder, fc_norm, head}."""
    cfg = model_lib.preset("tiny", decoder_layers=2)
    key = jax.random.key(seed)
    spec = jnp.zeros((1, 64, 128))

    def init(module, key, x):
        return nn.meta.unbox(module.init(key, x))["params"]

    if not pretraining:
        return cfg, init(model_lib.Classifier(cfg, 5), key, spec)
    encoder = init(model_lib.Encoder(cfg), key, spec)
    teacher = init(model_lib.Encoder(cfg), jax.random.key(seed + 1), spec)
    grid = jnp.zeros((1, 4, cfg.freq_patches, cfg.embed_dim))
    decoder = init(model_lib.Decoder(cfg), key, grid)
    return cfg, {"encoder": encoder, "decoder": decoder, "teacher": teacher}


@pytest.mark.parametrize("pretraining", [True, False], ids=["pretraining", "finetuned"])
def test_the_release_form_written_as_fairseq_loads_in_pytorch_and_comes_back_equal(
    tmp_path, pretraining
):
    cfg, params = our_release_params(4, pretraining)
    path = torch_import.write_release_checkpoint(tmp_path / "ours.pt", params, cfg)
    checkpoint = torch.load(path, weights_only=True)  # tensors and plain containers only
    assert checkpoint["cfg"]["model"]["embed_dim"] == cfg.embed_dim
    state = checkpoint["model"]
    classes = 0 if pretraining else 5
    torch_model = ref.ReleaseModel(
        dim=64, depth=2, num_heads=4, num_classes=classes,
        decoder_layers=2 if pretraining else 0, decoder_groups=4, decoder_grid=(4, 8),
    )  # fmt: skip
    student = {k.removeprefix("model."): v for k, v in state.items() if k != "_ema"}
    torch_model.load_state_dict(student)  # strict: every name and shape
    spec = spectrogram(64, seed=5)
    encoder = model_lib.Encoder(cfg)
    ours = encoder.apply({"params": params["encoder"]}, jnp.asarray(spec)).tokens
    with torch.no_grad():
        theirs, _ = torch_model(torch.from_numpy(spec))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    back = torch_import.split_state(torch_import.load_checkpoint(path))
    restored = torch_import.convert(back, torch_import.infer_config(back.student, 4))
    jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(np.asarray, params))


def broken_copy(tmp_path, folder, edit):
    """A copy of ``folder`` whose tensors ``edit`` changed."""
    state = {
        k: v.clone() for k, v in torch_load_safetensors(str(folder / "model.safetensors")).items()
    }
    edit(state)
    out = tmp_path / f"broken-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    torch_save_safetensors(state, str(out / "model.safetensors"))
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out


def test_a_missing_extra_or_misshaped_tensor_is_refused_by_name(tmp_path):
    folder = save_folder(tmp_path / "eat", eat_model(SMALL, 527), eat_config(**SMALL))
    cases = {
        "model.blocks.1.mlp.fc2.bias": lambda s: s.pop("model.blocks.1.mlp.fc2.bias"),
        "model.decoder.proj.weight": lambda s: s.update(
            {"model.decoder.proj.weight": torch.zeros(3)}
        ),
        "model.blocks.0.attn.qkv.weight: file (192, 65)": lambda s: s.update(
            {"model.blocks.0.attn.qkv.weight": torch.zeros(192, 65)}
        ),
    }  # fmt: skip
    for name, edit in cases.items():
        with pytest.raises(ValueError, match=name.replace("(", r"\(").replace(")", r"\)")):
            hf_weights.import_model(str(broken_copy(tmp_path, folder, edit)))
    (folder / "config.json").write_text(json.dumps(eat_config(**SMALL, qkv_bias=False)))
    with pytest.raises(ValueError, match="qkv_bias=False"):
        hf_weights.import_model(str(folder))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        (folder / "model.safetensors").unlink()
        hf_weights.import_model(str(folder))


def bfloat16_file(tmp_path) -> bytes:
    torch_save_safetensors({"a": torch.zeros(3, dtype=torch.bfloat16)}, str(tmp_path / "bf"))
    return (tmp_path / "bf").read_bytes()


def test_a_malformed_safetensors_header_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    folder = save_folder(tmp_path / "eat", eat_model(SMALL, 527), eat_config(**SMALL))
    good = (folder / "model.safetensors").read_bytes()
    length = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + length])
    name = "model.blocks.0.norm1.bias"
    header[name]["shape"] = [65]  # 4 bytes more than its range
    shifted = json.dumps(header).encode()
    cases = {
        "header length": (10**9).to_bytes(8, "little") + good[8:],
        "not JSON": len(b"{oops").to_bytes(8, "little") + b"{oops" + good[8 + length :],
        name: len(shifted).to_bytes(8, "little") + shifted + good[8 + length :],
        "declare": good[:-4],  # truncated data
        "shorter than": good[:5],
        "BF16": bfloat16_file(tmp_path),
    }
    read = []
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: read.append(a))
    for message, data in cases.items():
        (folder / "model.safetensors").write_bytes(data)
        with pytest.raises(hf_weights.MalformedWeights, match=message):
            hf_weights.import_model(str(folder))
    assert read == []  # no tensor was read from any of them


def test_the_hub_is_asked_for_by_name_and_a_missing_path_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(hf_weights.HubUnavailable, match="pip install huggingface_hub"):
        hf_weights.import_model("hf://worstchan/EAT-base_epoch30_finetune_AS2M")
    # A relative path that happens to look like org/name is a path, never a download.
    with pytest.raises(FileNotFoundError, match="hf://worstchan/EAT-base"):
        hf_weights.import_model("worstchan/EAT-base")
    with pytest.raises(FileNotFoundError):
        hf_weights.import_model("/no/such/folder")


def test_an_untrusted_config_is_checked_by_arithmetic_and_by_its_field_names(tmp_path, monkeypatch):
    folder = save_folder(tmp_path / "eat", eat_model(SMALL, 527), eat_config(**SMALL))
    config = folder / "config.json"
    config.write_text(json.dumps(eat_config(**SMALL, frobnicate=1)))
    with pytest.raises(ValueError, match=r"fields this model does not have: \['frobnicate'\]"):
        hf_weights.import_model(str(folder))
    depths = []
    real_layout = hf_weights.layout
    monkeypatch.setattr(hf_weights, "layout", lambda hub: depths.append(hub.model.depth)
                        or real_layout(hub))  # fmt: skip
    monkeypatch.setattr(release_weights, "positions_table", None)  # never built to be compared
    config.write_text(json.dumps(eat_config(dim=64, depth=10**9, num_heads=4)))
    with pytest.raises(ValueError, match=r"describes \d+ tensors \(depth 1000000000\)"):
        hf_weights.import_model(str(folder))
    assert depths == [1, 2]  # the arithmetic's two small layouts, never the config's depth
    config.write_text(json.dumps(eat_config(**SMALL)))
    hf_weights.import_model(str(folder))  # the same folder, honest again, imports


@pytest.mark.subprocess
def test_infer_on_an_imported_eat_classifier_prints_audioset_names(tmp_path):
    torch_model = eat_model(SMALL, 527)
    with torch.no_grad():  # every clip scores "Music" (index 137) highest
        torch_model.model.head.weight.zero_()
        torch_model.model.head.bias.fill_(-5.0)
        torch_model.model.head.bias[137] = 5.0
    folder = save_folder(tmp_path / "eat", torch_model, eat_config(**SMALL))
    converted = subprocess.run(
        [sys.executable, str(th.ROOT / "launch" / "convert_torch.py"),
         f"--checkpoint={folder}", f"--output={tmp_path / 'export'}"],
        cwd=th.ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert '"kind": "finetuned"' in converted.stdout
    audio = np.random.default_rng(0).normal(scale=0.1, size=16000 * 3).astype(np.float32)
    soundfile.write(tmp_path / "clip.wav", audio, 16000)
    done = subprocess.run(
        [sys.executable, str(th.ROOT / "launch" / "infer.py"),
         f"--checkpoint={tmp_path / 'export'}", f"--audio={tmp_path / 'clip.wav'}", "--top_k=1"],
        cwd=th.ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Music 0.993" in done.stdout


def run_export(source, output, form):
    command = [
        sys.executable, str(th.ROOT / "launch" / "export.py"),
        f"--workdir={source}", f"--output={output}", f"--format={form}",
    ]  # fmt: skip
    return subprocess.run(command, cwd=th.ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.subprocess
def test_launch_export_writes_an_export_as_hf_folder_or_fairseq_checkpoint(tmp_path):
    cfg, params = our_plain_classifier(1)
    plain = checkpoints.export(
        tmp_path / "plain", params, cfg, kind="finetune", target_frames=512,
        norm=(-4.268, 4.569), pooling="cls", scores="sigmoid",
    )  # fmt: skip
    done = run_export(plain, tmp_path / "hf", "hf")
    assert done.returncode == 0, done.stderr[-3000:]
    torch_model = ref.EatModel(dim=64, depth=2, num_heads=4, num_classes=527)
    torch_model.load_state_dict(torch_load_safetensors(str(tmp_path / "hf" / "model.safetensors")))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["target_frames"] == 512
    refused = run_export(plain, tmp_path / "hf", "hf")  # never into a folder in use
    assert refused.returncode == 2 and "not empty" in refused.stderr
    release_cfg, release_params = our_release_params(2, pretraining=True)
    release = checkpoints.export(
        tmp_path / "release", release_params, release_cfg, kind="pretrain", target_frames=64,
        norm=(-4.268, 4.569),
    )  # fmt: skip
    done = run_export(release, tmp_path / "asda.pt", "fairseq")
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(tmp_path / "asda.pt", weights_only=True)["model"]
    assert sorted(state["_ema"]) == sorted(k for k in state if "decoder" not in k and k != "_ema")
    done = run_export(release, tmp_path / "hf-release", "hf")  # the release form too
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((tmp_path / "hf-release" / "config.json").read_text())
    assert written["attention"] == "asda" and written["architectures"] == ["ASDAModel"]


@pytest.mark.train
def test_fine_tuning_starts_from_an_imported_eat_encoder(tmp_path):
    from asda_jax import train_lib
    from asda_jax.data import datasets

    datasets.prepare("synthetic", tmp_path / "data", clips_per_class=4)
    folder = save_folder(
        tmp_path / "eat", eat_model(SMALL, 0), eat_config(**SMALL, variant="pretrain")
    )
    export = imported_export(folder, tmp_path / "export")
    config = config_lib.load_file("configs/finetune_demo.py", f"data_dir={tmp_path / 'data'}")
    config.finetune.init_from = str(export)
    config.model.update(preset="eat_base", embed_dim=64, depth=2, num_heads=4, decoder_dim=64)
    config.num_train_steps = config.optim.warmup_steps = 0
    state, _, _ = train_lib.train(config, tmp_path / "ft")
    imported = hf_weights.import_model(str(folder)).params["encoder"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["encoder"]), imported)


def test_a_release_cfg_is_copied_only_for_the_same_architecture(tmp_path):
    cfg, params = our_release_params(6, pretraining=False)
    release_cfg = {
        "model": {"_name": "ASDA", "embed_dim": 64, "depth": 2, "num_heads": 4},
        "task": {"_name": "audio_classification"},
    }
    path = torch_import.write_release_checkpoint(tmp_path / "a.pt", params, cfg, release_cfg)
    assert torch.load(path, weights_only=True)["cfg"] == release_cfg
    other = {"model": release_cfg["model"] | {"depth": 12}}
    with pytest.raises(ValueError, match="depth: 12 vs ours 2"):
        torch_import.write_release_checkpoint(tmp_path / "b.pt", params, cfg, other)
    assert not (tmp_path / "b.pt").exists()


def test_an_eat_fairseq_checkpoint_imports_as_plain_attention(tmp_path):
    """EAT's own .pt: the release's names with a fused attn.qkv and a 4× MLP."""
    release = ref.ReleaseModel(dim=64, depth=2, num_heads=4)
    release.blocks = torch.nn.ModuleList(
        ref.AltBlock(64, 4, 4.0, ref.PlainAttention) for _ in range(2)
    )
    release = ref.randomize_(release, 7).eval()
    torch.save({"model": release.state_dict()}, tmp_path / "eat.pt")
    loaded = torch_import.split_state(torch_import.load_checkpoint(tmp_path / "eat.pt"))
    cfg = torch_import.infer_config(loaded.student, num_heads=4)
    assert cfg.attention == "plain" and cfg.mlp_ratio == 4.0
    assert not any(torch_import.key_report(loaded, cfg).values())
    params = torch_import.convert(loaded, cfg)
    spec = spectrogram(128, seed=8)
    ours = model_lib.Encoder(cfg).apply({"params": params["encoder"]}, jnp.asarray(spec)).tokens
    with torch.no_grad():
        np.testing.assert_allclose(ours, release(torch.from_numpy(spec))[0], atol=1e-5)


def test_both_formats_write_to_and_read_from_a_bucket(gcs_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would appear here
    cfg, params = our_plain_classifier(8)
    folder = hf_weights.export_model(
        f"{gcs_bucket}/weights/hf", params, cfg, 1024, head=AUTHORS_HEAD
    )
    imported = hf_weights.import_model(str(folder))
    jax.tree.map(np.testing.assert_array_equal, imported.params, params)
    release_cfg, release_params = our_release_params(9, pretraining=False)
    url = f"{gcs_bucket}/weights/asda.pt"
    torch_import.write_release_checkpoint(url, release_params, release_cfg)
    with storage.path(url).open("rb") as f:
        state = torch.load(f, weights_only=True)["model"]
    assert state["head.bias"].shape == (5,)
    with pytest.raises(FileExistsError):
        torch_import.write_release_checkpoint(url, release_params, release_cfg)
    assert not list(tmp_path.rglob("gs:*"))
