"""Converts PyTorch weights into an export of ours: the authors' fairseq checkpoints
(ASDA or EAT) and Hugging Face model folders of EAT's layout (EAT, SSLAM).

    python launch/convert_torch.py --checkpoint=ASDA_pretrain.pt --output=exports/asda-as2m
    python launch/convert_torch.py --checkpoint=ASDA_finetuned_as2m.pt --output=exports/asda-ft
    python launch/convert_torch.py --checkpoint=EAT-base_epoch30_finetune_AS2M/ --output=exports/eat
    python launch/convert_torch.py --checkpoint=hf://worstchan/EAT-base_epoch30_pretrain \
        --output=exports/eat-pretrain

A ``.pt`` is read without executing any pickled code (asda_jax/torch_import.py; a file
that names code is refused; needs PyTorch). A folder (``config.json`` +
``model.safetensors``) is read with safetensors' NumPy API (asda_jax/hf_weights.py); a
hub repository, named ``hf://org/name``, where huggingface_hub is installed and the
hub can be reached. Prints a
report of missing and unexpected keys, shape mismatches and the positional table's
distance from ours, then writes ``<output>/model.json`` + ``<output>/params/``
({encoder, decoder, teacher} for a fairseq pretraining checkpoint, {encoder} for a
Hugging Face pretrained model, {encoder, fc_norm, head} for a fine-tuned one), which
fine-tuning (finetune.init_from), extract, infer and the HEAR module load.

A ``.pt``'s input length and normalisation are read from its ``cfg`` (or legacy
``args``): ``target_length``, and ``esc50_eval``/``spcv2_eval``/``fsd50k_eval`` for
those datasets' statistics, else AudioSet's; the report says where each came from.
Where the checkpoint does not say, ``--target_frames`` and ``--norm`` must: a wrong
guess would give the model the wrong windows and statistics.

Exit codes: 0 written, 2 unreadable/refused/mismatched (nothing written).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from asda_jax import audio, checkpoints, cli, hf_weights, release_weights, storage, torch_import

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A release .pt file, or a Hugging Face folder or id.")
flags.DEFINE_string("output", None, "A new (or empty) directory for the export.")
flags.DEFINE_integer("num_heads", None, "Attention heads of a .pt (default: embed_dim / 64).")
flags.DEFINE_integer(
    "target_frames", None, "Input frames a .pt's model was trained on (default: its cfg's)."
)
flags.DEFINE_enum(
    "norm", None, list(audio.NORM_STATS), "A .pt's fbank normalisation (default: its cfg's)."
)
flags.mark_flags_as_required(["checkpoint", "output"])


def convert_release(path: str):
    """(params, ModelConfig, report, description) of a release .pt; raises on a mismatch."""
    checkpoint = torch_import.load_checkpoint(path)
    release = torch_import.split_state(checkpoint)
    cfg = torch_import.infer_config(release.student, FLAGS.num_heads)
    report = torch_import.key_report(release, cfg)
    problems = {k: v for k, v in report.items() if v and not k.startswith("unexpected")}
    if problems:
        raise checkpoints.CheckpointMismatch(f"does not fit {cfg}: {problems}")
    frames, norm, said = torch_import.release_input(checkpoint, FLAGS.target_frames, FLAGS.norm)
    report = {"kind": release.kind, "input": said, **report}
    params = torch_import.convert(release, cfg)
    torch_import.check_shapes(params, cfg)
    if release_weights.POSITIONS in release.student:
        distance = release_weights.positions_max_difference(release.student, cfg)
        report["positions_max_difference"] = distance
    description = dict(
        source=path, kind=release.kind, target_frames=frames, norm=audio.NORM_STATS[norm]
    )
    if release.kind == "finetuned":
        classes = params["head"]["bias"].shape[0]
        description |= release_weights.classifier_description(classes)
    return params, cfg, report, description


def convert_hugging_face(source: str):
    """(params, ModelConfig, report, description) of a Hugging Face folder (EAT's or
    ours) or ``hf://org/name``."""
    imported = hf_weights.import_model(source)
    report = dict(
        kind=imported.hub.kind, positions_max_difference=imported.positions_max_difference,
        ignored_training_settings=imported.hub.ignored,
    )  # fmt: skip
    return imported.params, imported.hub.model, report, imported.description(source)


def main(argv):
    del argv
    try:
        from_hub = FLAGS.checkpoint.startswith(hf_weights.HUB_PREFIX)
        is_file = not from_hub and storage.path(FLAGS.checkpoint).is_file()
        convert = convert_release if is_file else convert_hugging_face
        params, cfg, report, description = convert(FLAGS.checkpoint)
        print(json.dumps(report, indent=2))
        out = checkpoints.export(FLAGS.output, params, cfg, **description)
    except (FileNotFoundError, FileExistsError, ValueError, hf_weights.HubUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}: {sorted(params)}")


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
